"""The SMSKD engine: TCP weights by hand, the frozen reference, stage transitions, determinism,
resume, and the train command end to end."""

from __future__ import annotations

import gc
import json
import subprocess
import sys
import weakref

import pytest
import torch
import torch.nn.functional as F
from conftest import make_plan

from smskd_search.data import TensorLoader, load_data
from smskd_search.engine import run_plan, tcp_weights
from smskd_search.engine import stage as stage_mod
from smskd_search.engine.device import pick_precision
from smskd_search.engine.frozen import FrozenForward, frozen_copy
from smskd_search.engine.tcp import reference_loss
from smskd_search.engine.trainer import ReferenceTerm, Schedule, train_epoch
from smskd_search.methods import MethodContext, build_method
from smskd_search.models import create_model, probe_shapes
from smskd_search.plan import ReferenceSpec, ScheduleSpec, save_plan

# Teacher logits whose softmax true-class probabilities are easy to write out:
# row 0: logits (ln 3, 0, 0) -> p = (0.6, 0.2, 0.2), label 0 -> p_true = 0.6
# row 1: logits (0, 0, 0)    -> p = 1/3 each,          label 2 -> p_true = 1/3
# row 2: logits (0, ln 8, 0) -> p = (0.1, 0.8, 0.1),   label 0 -> p_true = 0.1
LN3, LN8 = torch.log(torch.tensor(3.0)).item(), torch.log(torch.tensor(8.0)).item()
T_LOGITS = torch.tensor([[LN3, 0.0, 0.0], [0.0, 0.0, 0.0], [0.0, LN8, 0.0]])
LABELS = torch.tensor([0, 2, 0])


@pytest.mark.parametrize(
    "mode, normalize, expected",
    [
        ("inverse", "none", [0.4, 2 / 3, 0.9]),
        ("direct", "none", [0.6, 1 / 3, 0.1]),
        ("uniform", "none", [1.0, 1.0, 1.0]),
        ("none", "none", [0.0, 0.0, 0.0]),
        # batch_mean: inverse weights sum to 0.4 + 0.6667 + 0.9 = 1.9667, mean 0.65556
        ("inverse", "batch_mean", [0.4 / 0.655556, (2 / 3) / 0.655556, 0.9 / 0.655556]),
        # direct weights sum to 0.6 + 0.3333 + 0.1 = 1.0333, mean 0.344444
        ("direct", "batch_mean", [0.6 / 0.344444, (1 / 3) / 0.344444, 0.1 / 0.344444]),
        ("none", "batch_mean", [0.0, 0.0, 0.0]),
    ],
)
def test_tcp_weights_by_hand(mode, normalize, expected):
    w = tcp_weights(T_LOGITS, LABELS, mode, normalize)
    torch.testing.assert_close(w, torch.tensor(expected), atol=1e-5, rtol=1e-5)
    assert not w.requires_grad


def test_reference_loss_by_hand():
    # Student logits 0 -> uniform; reference logits (ln 2, 0) at tau = 1 -> (2/3, 1/3).
    s = torch.zeros(2, 2, requires_grad=True)
    r = torch.tensor([[torch.log(torch.tensor(2.0)).item(), 0.0], [0.0, 0.0]])
    kl0 = (2 / 3) * torch.log(torch.tensor((2 / 3) / 0.5)) + (1 / 3) * torch.log(torch.tensor((1 / 3) / 0.5))
    w = torch.tensor([0.5, 2.0])
    loss = reference_loss(s, r, w, loss="logit_kl", tau=1.0)
    torch.testing.assert_close(loss, (0.5 * kl0 + 2.0 * 0.0) / 2)
    # tau^2 scaling: at tau = 2 the KL of the softened distributions is multiplied by 4.
    p = F.softmax(r / 2, 1)
    kl_t = (p * (p.log() - torch.log(torch.tensor(0.5)))).sum(1)
    torch.testing.assert_close(reference_loss(s, r, w, tau=2.0), (w * kl_t * 4).mean())
    loss.backward()
    assert s.grad.abs().sum() > 0


def test_mode_none_term_is_exactly_zero_with_zero_gradient():
    s = torch.randn(5, 4, requires_grad=True)
    r, t = torch.randn(5, 4), torch.randn(5, 4)
    y = torch.tensor([0, 1, 2, 3, 0])
    loss = reference_loss(s, r, tcp_weights(t, y, "none"), tau=4.0)
    loss.backward()
    assert loss.item() == 0.0 and torch.count_nonzero(s.grad) == 0


def _stage_results(result):
    return [(s.val_acc, s.val_loss, [m.train_loss for m in s.epoch_metrics]) for s in result.stages]


def test_none_mode_equals_no_reference_and_differs_from_inverse(tiny_problem, teacher_cache):
    stages = [("kd", 2), ("at", 2)]
    none = run_plan(make_plan(tiny_problem, stages, reference={"weight_mode": "none", "lambda_ref": 5.0}),
                    teacher_cache=teacher_cache)
    zero = run_plan(make_plan(tiny_problem, stages, reference={"weight_mode": "inverse", "lambda_ref": 0.0}),
                    teacher_cache=teacher_cache)
    inverse = run_plan(make_plan(tiny_problem, stages, reference={"weight_mode": "uniform", "lambda_ref": 5.0}),
                       teacher_cache=teacher_cache)
    assert _stage_results(none) == _stage_results(zero)
    assert not none.stages[1].reference_active and inverse.stages[1].reference_active
    assert _stage_results(none)[0] == _stage_results(inverse)[0]  # stage 1 never has a reference
    assert _stage_results(none)[1] != _stage_results(inverse)[1]
    assert all(m.train_ref == 0.0 for m in none.stages[1].epoch_metrics)
    assert all(m.train_ref > 0.0 for m in inverse.stages[1].epoch_metrics)


def test_reference_is_frozen_during_a_stage(tiny_problem, teacher_cache):
    from smskd_search.engine.teacher import ensure_teacher, load_teacher

    data = load_data(tiny_problem.dataset)
    record = ensure_teacher(tiny_problem, cache_root=teacher_cache, data=data)
    teacher = load_teacher(tiny_problem, record, data.info, "cpu")
    prec = pick_precision(torch.device("cpu"))
    torch.manual_seed(0)
    student = create_model("cnn_nano", 10, 1, 8)
    ref = frozen_copy(student)
    before = {k: v.clone() for k, v in ref.state_dict().items()}
    t_before = {k: v.clone() for k, v in teacher.state_dict().items()}
    shapes = probe_shapes(student, (1, 8, 8)), probe_shapes(teacher, (1, 8, 8))
    method = build_method("fitnet", {}, MethodContext(*shapes, teacher, 10, len(data.train)))
    opt = torch.optim.SGD(list(student.parameters()) + list(method.parameters()), lr=0.1, momentum=0.9)
    for cache in (False, True):
        imgs = data.train.images if cache else None
        train_epoch(student=student, method=method, teacher=FrozenForward(teacher, prec, imgs),
                    reference=ReferenceTerm(FrozenForward(ref, prec, imgs, need_features=False),
                                            ReferenceSpec(lambda_ref=3.0, weight_mode="uniform")),
                    loader=TensorLoader(data.train, 64, shuffle=True), optimizer=opt,
                    schedule=Schedule(0.1, ScheduleSpec(kind="constant"), 1, 0), stage_epoch=0, precision=prec)
    for k, v in ref.state_dict().items():
        assert torch.equal(v, before[k]), k  # parameters and BN buffers (running stats, counters)
    for k, v in teacher.state_dict().items():
        assert torch.equal(v, t_before[k]), k
    assert not ref.training and not teacher.training
    assert all(not p.requires_grad for p in ref.parameters())
    assert any(not torch.equal(v, student.state_dict()[k]) for k, v in before.items())  # the student moved


def test_stage_transitions(tiny_problem, teacher_cache, tmp_path, monkeypatch):
    copies, methods = [], []
    real_copy, real_build = stage_mod.frozen_copy, stage_mod.build_method

    def recording_copy(model):
        ref = real_copy(model)
        copies.append({k: v.clone() for k, v in ref.state_dict().items()})
        return ref

    def recording_build(name, params, ctx):
        m = real_build(name, params, ctx)
        methods.append((name, weakref.ref(m), [p.detach().clone() for p in m.parameters()]))
        return m

    monkeypatch.setattr(stage_mod, "frozen_copy", recording_copy)
    monkeypatch.setattr(stage_mod, "build_method", recording_build)
    plan = make_plan(tiny_problem, [("fitnet", 2), ("kd", 1), ("fitnet", 1)])
    run_plan(plan, teacher_cache=teacher_cache, out_dir=tmp_path)
    assert len(copies) == 2  # a reference for stages 2 and 3
    # Stage k+1 starts from (its reference is) stage k's final student, as checkpointed.
    for k, ref_state in enumerate(copies):
        saved = torch.load(tmp_path / f"stage{k + 1}.pt", weights_only=False)["student"]
        assert all(torch.equal(ref_state[n], saved[n]) for n in saved)
    gc.collect()
    assert [n for n, _, _ in methods] == ["fitnet", "kd", "fitnet"]
    assert all(ref() is None for _, ref, _ in methods), "a stage's method (and its regressor) outlived the stage"
    # The third stage built a fresh regressor: same initial weights as the first (seeded per stage
    # index, so not identical), and not the trained ones.
    assert len(methods[0][2]) == len(methods[2][2]) > 0
    assert any(not torch.equal(a, b) for a, b in zip(methods[0][2], methods[2][2]))


def test_same_plan_and_seed_give_identical_metrics(tiny_problem, teacher_cache):
    plan = make_plan(tiny_problem, [("dkd", 2), ("fitnet", 1)], reference={"weight_mode": "inverse", "lambda_ref": 2.0})
    a = run_plan(plan, teacher_cache=teacher_cache)
    b = run_plan(plan, teacher_cache=teacher_cache)
    assert _stage_results(a) == _stage_results(b)
    c = run_plan(plan.model_copy(update={"seed": 1}), teacher_cache=teacher_cache)
    assert _stage_results(a) != _stage_results(c)


@pytest.mark.parametrize("restart", [True, False])
def test_resume_after_a_stage_equals_one_run(tiny_problem, teacher_cache, tmp_path, restart):
    plan = make_plan(tiny_problem, [("kd", 2), ("at", 1), ("dkd", 2)], restart_optimizer=restart,
                     reference={"lambda_ref": 1.5})
    whole = run_plan(plan, teacher_cache=teacher_cache, out_dir=tmp_path / "whole")
    stop_after_first = lambda k, cum, res, ckpt: k == 0  # noqa: E731
    part = run_plan(plan, teacher_cache=teacher_cache, out_dir=tmp_path / "part", on_stage_end=stop_after_first)
    assert part.stopped_early and len(part.stages) == 1
    resumed = run_plan(plan, teacher_cache=teacher_cache, out_dir=tmp_path / "part", resume=True)
    assert resumed.resumed_from_stage == 0
    assert _stage_results(resumed) == _stage_results(whole)
    final_whole = torch.load(tmp_path / "whole" / "stage3.pt", weights_only=True)["student"]
    final_resumed = torch.load(tmp_path / "part" / "stage3.pt", weights_only=True)["student"]
    assert all(torch.equal(final_whole[k], final_resumed[k]) for k in final_whole)


def test_one_workbench_serves_runs_that_tell_one_stream_of_stage_events(tiny_problem, teacher_cache, tmp_path):
    """The workbench's way (a search's worker, verify, train): one set-up for several runs, each run
    telling its stages as events: resumed from its own checkpoint, reused from the stage cache (whole
    or partial), trained; the numbers are those of the one-call form."""
    from smskd_search.engine import EpochTrained, PrefixCache, RunOptions, StageTrained, Workbench

    plan = make_plan(tiny_problem, [("kd", 2), ("dkd", 2), ("kd", 1)], reference={"lambda_ref": 1.5})
    bench = Workbench.open(tiny_problem, device="cpu", teacher_cache=teacher_cache,
                           stage_cache=PrefixCache(tmp_path / "stages"))
    events: list = []

    def kinds(on_stop=None):
        def sink(event):
            events.append(event)
            return on_stop is not None and on_stop(event)
        return sink

    def told():
        out = [(type(e).__name__, e.stage) for e in events]
        events.clear()
        return out

    # Stopped after its first stage (a pruned trial), with rungs at 1 and 3 epochs.
    options = RunOptions(out_dir=tmp_path / "a", partial_at=frozenset({1, 3}))
    cut = run_plan(plan, bench, options, kinds(lambda e: isinstance(e, StageTrained)))
    assert cut.stopped_early and told() == [("EpochTrained", 0), ("EpochTrained", 0), ("StageTrained", 0)]
    # Resumed from its own checkpoint: stage 1 is told as resumed, stage 2 goes on (trained).
    resumed = run_plan(plan, bench, RunOptions(out_dir=tmp_path / "a", resume=True, partial_at=frozenset({1, 3})),
                       kinds())
    assert resumed.epochs_resumed == 2 and not resumed.stopped_early and told() == [
        ("StageResumed", 0), ("EpochTrained", 1), ("EpochTrained", 1), ("StageTrained", 1), ("EpochTrained", 2),
        ("StageTrained", 2)]
    # Another folder, the same workbench: the stage cache has every stage now.
    again = run_plan(plan, bench, RunOptions(out_dir=tmp_path / "b"), kinds())
    assert told() == [("StageReused", 0), ("StageReused", 1), ("StageReused", 2)]
    assert (again.epochs_reused, again.epochs_trained) == (5, 0)
    one_call = run_plan(plan, teacher_cache=teacher_cache)
    assert _stage_results(again) == _stage_results(resumed) == _stage_results(one_call)
    # A partial entry: a plan whose second stage is longer goes on from the rung at 3 epochs
    # (a cosine schedule: only a stage of the same length shares it, so cut one at 3 epochs first).
    longer = make_plan(tiny_problem, [("kd", 2), ("dkd", 3)], reference={"lambda_ref": 1.5})

    def stop_at_3(event):
        return isinstance(event, EpochTrained) and event.metrics.cum_epochs == 3 and _raise()

    with pytest.raises(_Stopped):
        run_plan(longer, bench, RunOptions(partial_at=frozenset({3})), kinds(stop_at_3))
    told()
    went_on = run_plan(longer, bench, RunOptions(partial_at=frozenset({3})), kinds())
    assert told() == [("StageReused", 0), ("EpochsReused", 1), ("EpochTrained", 1), ("EpochTrained", 1),
                      ("StageTrained", 1)]
    assert (went_on.epochs_reused, went_on.epochs_trained) == (3, 2)
    assert _stage_results(went_on) == _stage_results(run_plan(longer, teacher_cache=teacher_cache))


class _Stopped(Exception):
    pass


def _raise():
    raise _Stopped


def test_the_earlier_keywords_are_checked(tiny_problem, teacher_cache):
    from smskd_search.engine import Workbench

    plan = make_plan(tiny_problem, [("kd", 1)])
    with pytest.raises(TypeError, match="unexpected keyword arguments: on_stage"):
        run_plan(plan, teacher_cache=teacher_cache, on_stage=print)
    bench = Workbench.open(tiny_problem, device="cpu", teacher_cache=teacher_cache)
    with pytest.raises(TypeError, match="either as a Workbench or as keywords"):
        run_plan(plan, bench, device="cpu")


class _RunsCode:
    """Unpickling this runs code (what a pickle-only checkpoint could do): it writes a marker file."""

    marker = ""

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_stage_checkpoints_load_as_plain_data_and_a_pickle_is_never_run(tiny_problem, teacher_cache, tmp_path):
    from smskd_search.engine import UnsafeCheckpoint, discard_unsafe_checkpoints, latest_checkpoint, load_checkpoint

    plan = make_plan(tiny_problem, [("kd", 1), ("dkd", 1)], restart_optimizer=False)
    run_plan(plan, teacher_cache=teacher_cache, out_dir=tmp_path / "run", keep_student=False)
    ckpt = torch.load(tmp_path / "run" / "stage2.pt", weights_only=True)  # tensors and plain data only
    assert ckpt["optimizer"] is not None and latest_checkpoint(tmp_path / "run", plan.content_hash())["stage_index"] == 1

    marker = tmp_path / "ran"
    evil = _RunsCode()
    evil.marker = str(marker)
    torch.save({**ckpt, "stage_index": 2, "extra": evil}, tmp_path / "run" / "stage3.pt")
    with pytest.raises(UnsafeCheckpoint, match=r"stage3\.pt does not load as tensors and plain data \(weights_only=True\)"):
        load_checkpoint(tmp_path / "run" / "stage3.pt")
    # `train --resume` stops with that line; it never runs the pickle.
    with pytest.raises(UnsafeCheckpoint):
        run_plan(plan, teacher_cache=teacher_cache, out_dir=tmp_path / "run", resume=True)
    assert not marker.exists()
    # A search's trial drops it and trains that stage again.
    assert discard_unsafe_checkpoints(tmp_path / "run") == [tmp_path / "run" / "stage3.pt"]
    assert latest_checkpoint(tmp_path / "run", plan.content_hash())["stage_index"] == 1 and not marker.exists()


def test_callback_sees_cumulative_epochs(tiny_problem, teacher_cache):
    seen = []
    run_plan(make_plan(tiny_problem, [("kd", 2), ("at", 3)]), teacher_cache=teacher_cache,
             on_stage_end=lambda k, cum, res, ckpt: seen.append((k, cum, res.method, res.n_val)))
    assert seen == [(0, 2, "kd", 503), (1, 5, "at", 503)]


def test_teacher_output_cache_matches_per_batch_forwards(tiny_problem, teacher_cache):
    plan = make_plan(tiny_problem, [("kd", 2), ("fitnet", 1)], reference={"lambda_ref": 1.0})
    cached = run_plan(plan, teacher_cache=teacher_cache, cache_frozen_outputs=True)
    plain = run_plan(plan, teacher_cache=teacher_cache, cache_frozen_outputs=False)
    for a, b in zip(cached.stages, plain.stages):
        assert abs(a.val_acc - b.val_acc) <= 2 / a.n_val
        assert abs(a.epoch_metrics[-1].train_loss - b.epoch_metrics[-1].train_loss) < 1e-3


def _layer_output_dtypes(plan, teacher_cache, precision: str):
    """The run's result, and the dtypes the conv and linear layers' forwards gave during the run."""
    seen: set[torch.dtype] = set()

    def hook(module, args, output):
        if isinstance(module, (torch.nn.Conv2d, torch.nn.Linear)) and isinstance(output, torch.Tensor):
            seen.add(output.dtype)

    handle = torch.nn.modules.module.register_module_forward_hook(hook)
    try:
        result = run_plan(plan, teacher_cache=teacher_cache, precision=precision)
    finally:
        handle.remove()
    return result, seen


def test_bf16_autocast_on_cpu_matches_fp32_losses(tiny_problem, teacher_cache):
    plan = make_plan(tiny_problem, [("kd", 1), ("fitnet", 1)], reference={"lambda_ref": 1.0})
    fp32, fp32_dtypes = _layer_output_dtypes(plan, teacher_cache, "fp32")
    bf16, bf16_dtypes = _layer_output_dtypes(plan, teacher_cache, "bf16")
    # The layers computed in bfloat16 under bf16 (autocast keeps the loss and softmax in float32),
    # and only under bf16: a run that ignored the precision would show float32 alone.
    assert fp32_dtypes == {torch.float32} and torch.bfloat16 in bf16_dtypes
    # Close to the fp32 numbers, not equal to them: bfloat16 keeps 8 significant bits.
    assert [m.train_loss for s in fp32.stages for m in s.epoch_metrics] != [
        m.train_loss for s in bf16.stages for m in s.epoch_metrics]
    for a, b in zip(fp32.stages, bf16.stages):
        ma, mb = a.epoch_metrics[0], b.epoch_metrics[0]
        assert ma.train_loss == pytest.approx(mb.train_loss, rel=0.05)
        assert abs(a.val_acc - b.val_acc) < 0.1


def test_train_cli_two_stage_plan_reports_test_accuracy(tmp_path, tiny_problem, teacher_cache):
    plan = make_plan(tiny_problem, [("kd", 2), ("fitnet", 2)], name="two-stage")
    path = save_plan(plan, tmp_path / "plan.yaml")
    env = {**__import__("os").environ, "SMSKD_STUDIES": str(tmp_path / "studies")}
    out = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-m", "smskd_search.cli", "train", str(path), "--out", str(out), "--threads", "1"],
                          capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr
    assert "stage 2/2 fitnet(2) done at 4 epochs" in proc.stdout and "(with reference)" in proc.stdout
    assert "test acc" in proc.stdout and "(n=360" in proc.stdout
    res = json.loads((out / "results.json").read_text())
    assert [s["method"] for s in res["stages"]] == ["kd", "fitnet"] and 0.0 <= res["test_acc"] <= 1.0
    assert (out / "stage1.pt").is_file() and (out / "stage2.pt").is_file()
    # The same plan through the library, same thread count: the same numbers.
    lib = run_plan(plan, teacher_cache=tmp_path / "studies" / "teachers")
    assert [s["val_acc"] for s in res["stages"]] == [s.val_acc for s in lib.stages]


def test_lr_schedules_at_hand_computed_points():
    import math

    from smskd_search.engine.optim import lr_at, step_progress

    cos, step = ScheduleSpec(kind="cosine"), ScheduleSpec(kind="step", milestones=[0.5, 0.75], gamma=0.1)
    wsd = ScheduleSpec(kind="wsd", milestones=[0.6])
    assert lr_at(0.1, cos, 0.5) == pytest.approx(0.05)
    # step: epoch boundaries only; 3 of 4 epochs in: past the first milestone, not the second.
    assert [lr_at(1.0, step, step_progress(e, 7, 8, 4, "step")) for e in range(4)] == pytest.approx([1, 1, 0.1, 0.01])
    # wsd: flat until 60% of the stage, then half a cosine over the remaining 40%.
    assert lr_at(0.1, wsd, 0.0) == lr_at(0.1, wsd, 0.599) == 0.1
    assert lr_at(0.1, wsd, 0.8) == pytest.approx(0.05)
    assert lr_at(0.1, wsd, 0.7) == pytest.approx(0.05 * (1 + math.cos(math.pi / 4)))
    assert lr_at(0.1, wsd, 1.0) == pytest.approx(0.0, abs=1e-12)
    with pytest.raises(ValueError, match="wsd schedule needs milestones"):
        ScheduleSpec(kind="wsd", milestones=[])
