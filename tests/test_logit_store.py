"""The teacher-logit store (engine level, no Ray): stored logits equal a recomputation, keys say
what determines a batch stream, runs served from the store train the same numbers bit for bit on
the CPU, a stream the key got wrong is caught, and both tiers keep to their caps."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from conftest import make_plan

from smskd_search.data import TensorLoader
from smskd_search.engine import (
    LogitStore,
    Runtime,
    StoreMismatch,
    run_plan,
    stage_prefix_key,
    teacher_logits_key,
)
from smskd_search.engine.device import pick_precision
from smskd_search.engine.logit_store import EpochLogits
from smskd_search.engine.stage import stage_seed
from smskd_search.methods import METHODS
from smskd_search.methods.fitnet import FitNet
from smskd_search.plan import AugmentSpec, RecipeSpec

AUG = RecipeSpec(lr=0.05, augment=AugmentSpec(crop_padding=1, flip=True))
REF = {"weight_mode": "inverse", "lambda_ref": 1.5}
# float16 keeps 11 significant bits: rounding to it errs by at most 2^-11 of the value, plus half
# the spacing of its subnormals (2^-25) below 2^-14.
FP16_RTOL, FP16_ATOL = 2.0**-11, 2.0**-25


def _curve(result):
    return [(m.cum_epochs, m.val_acc, m.val_loss, m.train_loss, m.train_kd, m.train_ref)
            for s in result.stages for m in s.epoch_metrics]


def _student(result):
    return {k: v.detach().clone() for k, v in result.student.state_dict().items()}


def _keys(plan, shared, k, epochs, tag="exact"):
    rt = Runtime.current(torch.device("cpu"), pick_precision(torch.device("cpu"), "auto"))
    return [teacher_logits_key(plan, k, e, loader_seed=stage_seed(plan.seed, k),
                               train_shape=tuple(shared["data"].train.images.shape),
                               teacher_sha256=shared["teacher_record"].sha256, runtime=rt, stored=tag)
            for e in range(epochs)]


def _recompute(plan, shared, k, epochs):
    """The teacher's logits over each epoch of stage k, from a loader built here, as the stage's is."""
    data, teacher = shared["data"], shared["teacher_model"]
    loader = TensorLoader(data.train, plan.recipe.batch_size, shuffle=True, augment=plan.recipe.augment,
                          generator=torch.Generator().manual_seed(stage_seed(plan.seed, k)))
    out = []
    with torch.no_grad():
        for _ in range(epochs):
            logits, order = zip(*[(teacher(x)[0], idx) for x, _, idx in loader])
            out.append((torch.cat(logits), torch.cat(order)))
    return out


@pytest.mark.parametrize("dtype", [None, torch.float16])
def test_stored_logits_equal_a_recomputation(tiny_problem, shared, dtype):
    plan = make_plan(tiny_problem, [("kd", 2), ("dkd", 1)], recipe=AUG, reference=REF)
    store = LogitStore(None, dtype=dtype)
    run_plan(plan, logit_store=store, **shared)
    assert store.stored == 3
    tag = "exact" if dtype is None else "float16"
    worst = 0.0
    for k, epochs in ((0, 2), (1, 1)):
        for key, (logits, order) in zip(_keys(plan, shared, k, epochs, tag), _recompute(plan, shared, k, epochs)):
            entry = store.get(key)
            assert entry is not None and torch.equal(entry.indices, order)
            if dtype is None:
                assert entry.logits.dtype == torch.float32 and torch.equal(entry.logits, logits)
            else:
                assert entry.logits.dtype == torch.float16 and entry.dtype == torch.float32
                err = (entry.logits.float() - logits).abs()
                assert bool((err <= FP16_RTOL * logits.abs() + FP16_ATOL).all())
                worst = max(worst, err.max().item())
    if dtype is not None:
        assert worst > 0.0  # float16 does round: the tolerance above is what was needed


def test_a_warm_store_trains_the_same_numbers_without_the_teacher(tiny_problem, shared, tmp_path):
    plan = make_plan(tiny_problem, [("kd", 2), ("fitnet", 1), ("dkd", 1)], recipe=AUG, reference=REF)
    plain = run_plan(plan, **shared)
    forwards: list[int] = []
    hook = shared["teacher_model"].register_forward_hook(lambda m, i, o: forwards.append(i[0].shape[0]))
    try:
        cold = run_plan(plan, logit_store=LogitStore(tmp_path / "logits"), **shared)
        cold_samples, forwards[:] = sum(forwards), []
        # A fresh store on the folder: another process, served from disk.
        warm_store = LogitStore(tmp_path / "logits")
        warm = run_plan(plan, logit_store=warm_store, **shared)
    finally:
        hook.remove()
    assert cold.teacher_epochs_served == 0 and len(list((tmp_path / "logits").glob("*.pt"))) == 4
    # KD and DKD read the store; FitNets reads teacher features and runs the teacher for its epoch.
    assert warm.teacher_epochs_served == 3 and warm_store.served == 3
    assert warm_store.stored == 0  # the FitNets epoch ran the teacher but the store had its logits
    assert cold_samples - sum(forwards) == 3 * len(shared["data"].train)
    assert _curve(plain) == _curve(cold) == _curve(warm)
    a, b = _student(plain), _student(warm)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_float16_store_stays_within_tolerance_and_keys_apart(tiny_problem, shared):
    plan = make_plan(tiny_problem, [("kd", 2), ("dkd", 1)], recipe=AUG, reference=REF)
    plain = run_plan(plan, **shared)
    store = LogitStore(None, dtype=torch.float16)
    cold = run_plan(plan, logit_store=store, **shared)
    warm = run_plan(plan, logit_store=store, **shared)
    assert cold.teacher_epochs_served == 0 and warm.teacher_epochs_served == 3
    # The epochs that ran the forward trained on the rounded logits too: the order of trials does not matter.
    assert _curve(cold) == _curve(warm)
    # Not the same numbers (hence opt-in), but close: measured 7e-4 in val loss and 0.006 in val acc
    # (4 of 671 samples) on this plan, 0.013 in the largest weight.
    assert _curve(plain) != _curve(warm)
    assert max(abs(p[2] - w[2]) for p, w in zip(_curve(plain), _curve(warm))) < 0.005
    rt = Runtime(threads=1, device="cpu", precision="fp32")
    exact = stage_prefix_key(plan, 1, teacher_sha256="a" * 64, runtime=rt)
    assert stage_prefix_key(plan, 1, teacher_sha256="a" * 64, runtime=rt, teacher_logits="exact") == exact
    assert stage_prefix_key(plan, 1, teacher_sha256="a" * 64, runtime=rt, teacher_logits="float16") != exact


def test_a_float16_store_on_a_folder_computes_in_parts_what_it_serves(tiny_problem, shared, tmp_path):
    plan = make_plan(tiny_problem, [("kd", 2), ("dkd", 1)], recipe=AUG, reference=REF)
    cold_store = LogitStore(tmp_path / "half", dtype=torch.float16, parts=4)
    cold = run_plan(plan, logit_store=cold_store, **shared)
    warm = run_plan(plan, logit_store=LogitStore(tmp_path / "half", dtype=torch.float16, parts=4), **shared)
    in_memory = run_plan(plan, logit_store=LogitStore(None, dtype=torch.float16), **shared)
    # Parts computed ahead of the epoch are rounded as the epoch's own forward would be.
    assert cold.teacher_epochs_served == 0 and warm.teacher_epochs_served == 3
    assert _curve(cold) == _curve(warm) == _curve(in_memory)
    assert sorted(p.suffix for p in (tmp_path / "half").iterdir()) == [".pt"] * 3  # no part or claim left


def test_the_key_says_what_determines_the_batches_and_the_teacher(tiny_problem):
    rt = Runtime(threads=1, device="cpu", precision="fp32")
    base = make_plan(tiny_problem, [("kd", 2), ("dkd", 2)], recipe=AUG)

    def key(plan=base, k=1, epoch=1, loader_seed=7, shape=(100, 1, 8, 8), sha="a" * 64, runtime=rt, stored="exact"):
        return teacher_logits_key(plan, k, epoch, loader_seed=loader_seed, train_shape=shape, teacher_sha256=sha,
                                  runtime=runtime, stored=stored)

    def recipe(**update):
        return base.model_copy(update={"recipe": base.recipe.model_copy(update=update)})

    k0 = key()
    different = [
        key(plan=base.model_copy(update={"seed": base.seed + 1})), key(epoch=0), key(k=0), key(loader_seed=8),
        key(sha="b" * 64), key(shape=(101, 1, 8, 8)), key(stored="float16"),
        key(plan=recipe(augment=AugmentSpec(crop_padding=1))), key(plan=recipe(augment=AugmentSpec(flip=True))),
        key(plan=recipe(batch_size=32)),
        key(runtime=Runtime(threads=2, device="cpu", precision="fp32")),
        key(runtime=Runtime(threads=1, device="cuda", precision="fp32")),
        key(runtime=Runtime(threads=1, device="cpu", precision="bf16")),
        key(plan=base.model_copy(update={"problem": base.problem.model_copy(update={
            "dataset": base.problem.dataset.model_copy(update={"split_seed": 1})})})),
    ]
    assert len({k0, *different}) == len(different) + 1
    # What does not change a batch or the teacher is shared: the lr, the stages' methods and epochs.
    assert key(plan=recipe(lr=0.01)) == k0
    assert key(plan=make_plan(tiny_problem, [("fitnet", 5), ("kd", 1)], recipe=AUG)) == k0


def test_a_stored_epoch_that_does_not_match_its_batches_fails_loudly(tiny_problem, shared):
    plan = make_plan(tiny_problem, [("kd", 1)], recipe=AUG)
    store = LogitStore(None)
    run_plan(plan, logit_store=store, **shared)
    (key,) = _keys(plan, shared, 0, 1)
    entry = store.get(key)
    assert entry is not None
    # As if the key had missed the crop: same shuffle and logits, other images.
    store.put(key, EpochLogits(entry.logits, entry.indices, entry.checks + 1.0, entry.dtype))
    with pytest.raises(StoreMismatch, match="does not match"):
        run_plan(plan, logit_store=store, **shared)
    assert store.get(key) is None  # discarded: the next run computes and puts it again


def test_logits_only_methods_never_read_teacher_features(tiny_problem, shared, monkeypatch):
    logit_only = sorted(n for n, cls in METHODS.items() if not cls.teacher_features)
    assert logit_only == ["ce", "dkd", "kd"]
    store = LogitStore(None)
    for name in logit_only:
        plan = make_plan(tiny_problem, [(name, 1)], recipe=AUG)
        run_plan(plan, logit_store=store, **shared)
        assert run_plan(plan, logit_store=store, **shared).teacher_epochs_served == 1
    # A method that declared itself logits-only but reads features is told so, not given garbage.
    monkeypatch.setattr(FitNet, "teacher_features", False)
    plan = make_plan(tiny_problem, [("fitnet", 1)], recipe=AUG)
    with pytest.raises(AttributeError, match="teacher_features"):
        run_plan(plan, logit_store=store, **shared)


def test_unaugmented_runs_leave_the_store_alone(tiny_problem, shared):
    store = LogitStore(None)
    run_plan(make_plan(tiny_problem, [("kd", 1)]), logit_store=store, **shared)
    assert store.stored == 0 and store.memory_bytes() == 0


def _entry(n: int, fill: float = 1.0) -> EpochLogits:
    return EpochLogits(torch.full((n, 10), fill), torch.arange(n), torch.zeros(1, 2, dtype=torch.float64),
                       torch.float32)


def test_both_tiers_keep_to_their_caps(tmp_path):
    size = _entry(1000).nbytes
    mem = LogitStore(None, memory_max_bytes=int(2.5 * size))
    for key in "abc":
        mem.put(key, _entry(1000))
    assert mem.get("a") is None and mem.memory_bytes() <= mem.memory_max_bytes
    assert mem.get("b") is not None  # b used: c is now the least recently used
    mem.put("d", _entry(1000))
    assert (mem.get("c"), mem.get("b") is not None, mem.get("d") is not None) == (None, True, True)
    # Larger than the memory cap: not kept in memory, still on disk.
    big = LogitStore(tmp_path / "big", memory_max_bytes=size // 2)
    big.put("a", _entry(1000))
    assert big.memory_bytes() == 0 and big.get("a") is not None

    probe = LogitStore(tmp_path / "probe")
    probe.put("probe", _entry(1000))
    assert probe.disk is not None
    file_size = probe.disk.size_bytes()
    disk = LogitStore(tmp_path / "disk", max_bytes=int(2.5 * file_size), memory_max_bytes=0)
    # A full folder keeps what it has (the first epochs of a stream, which later trials read first).
    assert [disk.put(key, _entry(1000, fill=float(ord(key)))) for key in "abc"] == [True, True, False]
    assert disk.disk is not None and disk.disk.size_bytes() <= disk.disk.max_bytes
    assert disk.get("c") is None and [p.stem for p, _, _ in disk.disk.entries()] == ["a", "b"]
    got = disk.get("a")
    assert got is not None and torch.equal(got.logits, _entry(1000, fill=float(ord("a"))).logits)


def test_the_search_keeps_the_store_beside_the_stage_cache(tmp_path):
    from smskd_search.search import trainable as tr
    from smskd_search.search.teacher_transport import TeacherPayload

    payload = TeacherPayload({}, b"")
    stages, _, logits = tr._caches(tr.TrialContext(teacher=payload, cache_dir=str(tmp_path / "cache"),
                                                   cache_max_bytes=12345))
    assert isinstance(logits, LogitStore) and logits.disk is not None and stages is not None
    assert logits.disk.path("k") == tmp_path / "cache" / "teacher_logits" / "k.pt" and logits.disk.max_bytes == 12345
    assert stages.path("k").parent.parent == logits.disk.path("k").parent.parent
    # The same process's next trial gets the same store (its memory tier carries over).
    assert tr._caches(tr.TrialContext(teacher=payload, cache_dir=str(tmp_path / "cache")))[2] is logits
    # --no-cache: no store at all.
    assert tr._caches(tr.TrialContext(teacher=payload, cache_dir=None))[2] is None


def test_a_trial_hands_the_store_to_its_run(tiny_problem, shared, tmp_path, monkeypatch):
    import smskd_search.engine as engine
    from smskd_search.search import trainable as tr
    from smskd_search.search.teacher_transport import TeacherPayload

    class Tune:
        reports: list[dict] = []

        def get_checkpoint(self):
            return None

        def report(self, metrics, checkpoint=None):
            self.reports.append(metrics)

    got: list = []
    monkeypatch.setattr(tr, "tune", Tune())
    inputs = (shared["data"], shared["teacher_model"], shared["teacher_record"])
    monkeypatch.setattr(tr, "_shared_inputs", lambda plan, context, root: inputs)
    monkeypatch.setattr(engine, "run_plan",
                        lambda plan, bench, options, on_event: got.append(bench.logit_store) or SimpleNamespace(notes=[]))
    plan = make_plan(tiny_problem, [("kd", 1)], recipe=AUG)
    for cache_dir in (tmp_path / "cache", None):
        context = tr.TrialContext(teacher=TeacherPayload({}, b""), cache_dir=str(cache_dir) if cache_dir else None)
        tr.train_trial({"plan_yaml": plan.to_yaml(), "run_dir": str(tmp_path / "run"), "threads": 1}, context)
    assert Tune.reports == []  # no failure reported
    assert isinstance(got[0], LogitStore) and got[0].disk is not None
    assert got[0].disk.path("k") == tmp_path / "cache" / "teacher_logits" / "k.pt" and got[1] is None


def _span_fill(calls, delay=0.0):
    """A fill whose rows say which batches they stand for (row b holds b)."""
    import time

    def fill(lo, hi, claim):
        calls.append((lo, hi))
        if claim is not None:
            claim.beat()
        time.sleep(delay)
        return EpochLogits(torch.arange(lo, hi, dtype=torch.float32)[:, None].repeat(1, 3), torch.arange(lo, hi),
                           torch.zeros(hi - lo, 2, dtype=torch.float64), torch.float32)

    return fill


def _rows(entry):
    return entry.logits[:, 0].tolist()


def test_a_lone_process_computes_the_parts_in_order_and_keeps_the_whole_epoch(tmp_path):
    store, other = LogitStore(tmp_path / "s", parts=2), LogitStore(tmp_path / "s", parts=2)  # two processes' stores
    calls: list = []
    entry, share = store.shared("k", 4, _span_fill(calls))
    assert calls == [(0, 2), (2, 4)] and share == 1.0 and entry is not None and _rows(entry) == [0, 1, 2, 3]
    # The whole epoch stays, its parts and claims go.
    assert sorted(p.name for p in (tmp_path / "s").iterdir()) == ["k.pt"]
    entry, share = other.shared("k", 4, _span_fill(calls))
    assert len(calls) == 2 and share == 0.0 and _rows(entry) == [0, 1, 2, 3] and other.waited == 0
    # Only a local folder has claims (an object store has no exclusive create); no folder, none either.
    assert LogitStore(None).claims is None and LogitStore(tmp_path / "c", claims=False).claims is None
    assert LogitStore(None).shared("k", 4, _span_fill(calls)) == (None, 0.0) and len(calls) == 2


def test_parts_are_kept_as_the_whole_is_and_make_room_for_it(tmp_path):
    # A float16 store with room for about 1.3 epochs: the parts (float16 too) and the whole would not
    # fit side by side, but the whole replaces the parts.
    probe = LogitStore(tmp_path / "probe", dtype=torch.float16)
    probe.put("k", _span_fill([])(0, 400, None))
    assert probe.disk is not None
    cap = int(1.3 * probe.disk.size_bytes())
    store = LogitStore(tmp_path / "s", dtype=torch.float16, max_bytes=cap, parts=4)
    entry, share = store.shared("k", 400, _span_fill([]))
    assert share == 1.0 and entry.logits.dtype == torch.float16 and _rows(entry) == list(range(400))
    assert sorted(p.name for p in (tmp_path / "s").iterdir()) == ["k.pt"]


def test_processes_in_step_each_compute_a_share_of_the_epoch(tmp_path):
    from concurrent.futures import ThreadPoolExecutor

    calls: list = []
    stores = [LogitStore(tmp_path / "s", parts=4) for _ in range(2)]
    for st in stores:
        assert st.claims is not None
        st.claims.poll_s = 0.005
    import threading

    together = threading.Barrier(2)

    def one(st):
        together.wait()
        return st.shared("k", 8, _span_fill(calls, delay=0.25))

    with ThreadPoolExecutor(2) as pool:
        got = list(pool.map(one, stores))
    # Every span computed once, by one of the two; both hold the whole epoch; their shares add up to it.
    assert sorted(calls) == [(0, 2), (2, 4), (4, 6), (6, 8)]
    assert all(_rows(entry) == list(range(8)) for entry, _ in got)
    assert sum(share for _, share in got) == 1.0 and all(0.0 < share < 1.0 for _, share in got)
    assert sorted(p.name for p in (tmp_path / "s").iterdir()) == ["k.pt"]


def test_a_waiter_reads_the_holders_parts_and_computes_those_nobody_puts(tmp_path):
    import threading

    holder, waiter = LogitStore(tmp_path / "s", parts=2), LogitStore(tmp_path / "s", parts=2)
    assert holder.claims is not None and holder.disk is not None and waiter.claims is not None
    waiter.claims.poll_s = 0.005
    for put in (True, False):
        key, calls = f"k{put}", []
        claims = [holder.claims.claim(f"{key}.part{i}of2") for i in range(2)]
        assert all(c is not None for c in claims)
        got: list = []
        t = threading.Thread(target=lambda k, fill, out: out.append(waiter.shared(k, 4, fill)),
                             args=(key, _span_fill(calls), got))
        t.start()
        t.join(0.3)
        assert t.is_alive() and calls == []  # waiting on the claims
        if put:
            for i, (lo, hi) in enumerate([(0, 2), (2, 4)]):
                holder.disk.put(f"{key}.part{i}of2", _span_fill([])(lo, hi, None).to_payload())
        for c in claims:
            c.release()
        t.join(10)
        (entry, share), = got
        assert _rows(entry) == [0, 1, 2, 3]
        # Released with their parts: served. Released without (their holder failed): computed here.
        assert (share, calls) == ((0.0, []) if put else (1.0, [(0, 2), (2, 4)]))
    assert waiter.waited == 2 and waiter.wait_s > 0.25


def test_a_dead_holders_claim_goes_stale_and_is_taken_over(tmp_path):
    import os
    import time

    store = LogitStore(tmp_path / "s", parts=1)
    assert store.claims is not None
    dead = tmp_path / "s" / "k.part0of1.claim"
    dead.parent.mkdir()
    dead.write_text("elsewhere 1 token\n")
    assert store.claims.held("k.part0of1")
    old = time.time() - store.claims.stale_s - 1
    os.utime(dead, (old, old))
    assert not store.claims.held("k.part0of1")
    calls: list = []
    entry, share = store.shared("k", 3, _span_fill(calls))
    assert share == 1.0 and calls == [(0, 3)] and not dead.exists()
    # A fresh claim of a process of this machine that has ended (killed with its search) is not waited out.
    import socket
    import subprocess
    import sys

    ended = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead.write_text(f"{socket.gethostname()} {int(ended.stdout)} token\n")
    assert not store.claims.held("k.part0of1")
    dead.write_text(f"{socket.gethostname()} {os.getpid()} token\n")  # alive: held
    assert store.claims.held("k.part0of1")


def test_parts_of_the_teacher_pass_are_the_full_passs_and_leave_the_loader_where_it_was(tiny_problem, shared):
    from smskd_search.engine.device import pick_precision
    from smskd_search.engine.frozen import FrozenForward
    from smskd_search.engine.logit_store import EpochTeacher, TeacherPass, part_spans

    plan = make_plan(tiny_problem, [("kd", 1)], recipe=AUG)
    data = shared["data"]

    def loader():
        return TensorLoader(data.train, plan.recipe.batch_size, shuffle=True, augment=plan.recipe.augment,
                            generator=torch.Generator().manual_seed(5))

    forward = FrozenForward(shared["teacher_model"], pick_precision(torch.device("cpu"), "auto"))
    ahead, fresh = loader(), loader()
    spans = part_spans(len(ahead), 4)
    assert len(spans) == 4
    cpu = torch.device("cpu")
    teacher = TeacherPass(forward, ahead, device=cpu)
    # Out of order (a part further on starts a pass at its batch), then in order (continues it).
    parts = {i: teacher(*spans[i]) for i in (2, 0, 1, 3)}
    teacher.close()
    entry = EpochLogits.join([parts[i] for i in range(4)])
    # The next epoch of the loader the parts went over is the one they saw, and the joined logits check out.
    batches = [(x, idx) for x, _, idx in ahead]
    assert all(torch.equal(x, y) and torch.equal(i, j) for (x, i), (y, _, j) in zip(batches, fresh))
    served = EpochTeacher(forward, entry, need_features=False, device=cpu)
    for x, idx in batches:
        served(x, idx)
    assert served.finish() is None  # no StoreMismatch
    assert torch.equal(entry.logits, torch.cat([forward(x, i)[0] for x, i in batches]))


def test_two_processes_on_one_stream_run_the_teacher_once_per_epoch(tiny_problem, shared, teacher_cache, tmp_path):
    import multiprocessing as mp

    from _logit_worker import run_on_shared_store

    plan = make_plan(tiny_problem, [("kd", 3), ("dkd", 2)], recipe=AUG, reference=REF)
    threads = torch.get_num_threads()
    plain = _curve(run_plan(plan, **shared))
    # What a run asks of the teacher besides its epochs (its shapes probed): a run served every epoch.
    warm, samples = LogitStore(None), []
    run_plan(plan, logit_store=warm, **shared)
    hook = shared["teacher_model"].register_forward_hook(lambda m, i, o: samples.append(i[0].shape[0]))
    try:
        assert run_plan(plan, logit_store=warm, **shared).teacher_epochs_served == 5
    finally:
        hook.remove()
    probe = sum(samples)
    ctx = mp.get_context("spawn")
    barrier, out = ctx.Barrier(2), ctx.Queue()
    args = (tiny_problem.model_dump(mode="json"), plan.model_dump(mode="json"), str(teacher_cache),
            str(tmp_path / "logits"), threads, barrier, out)
    procs = [ctx.Process(target=run_on_shared_store, args=args) for _ in range(2)]
    for p in procs:
        p.start()
    got = [out.get(timeout=300) for _ in procs]
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    n, epochs = len(shared["data"].train), 5
    # Each batch of the 5 epochs went through the teacher once between them; the other process read it.
    assert sum(g["teacher_samples"] for g in got) == epochs * n + 2 * probe
    assert sum(g["stored"] for g in got) == epochs and sum(g["served"] for g in got) == pytest.approx(epochs)
    # And the numbers are those of a run without any store, in both.
    assert [tuple(c) for c in got[0]["curve"]] == [tuple(c) for c in got[1]["curve"]] == plain


def test_verify_shares_the_teacher_logits_of_its_runs_on_one_seed(tiny_problem, teacher_cache, tmp_path):
    from smskd_search.verify import run_verify

    plan = make_plan(tiny_problem, [("kd", 1), ("dkd", 1)], recipe=AUG, reference=REF)
    cached, _ = run_verify(plan, seeds=1, device="cpu", teacher_cache=teacher_cache, jobs=1,
                           stage_cache=tmp_path / "cache" / "stages")
    plain, _ = run_verify(plan, seeds=1, device="cpu", teacher_cache=teacher_cache, jobs=1)
    # The plan and its comparisons (single KD and DKD for 2 epochs, no reference, uniform) on one seed
    # read 3 epochs of batches between them: stage 1's first two and stage 2's first.
    assert len(list((tmp_path / "cache" / "teacher_logits").glob("*.pt"))) == 3
    assert [r.label for r in cached] == ["plan", "single:kd", "single:dkd", "no-reference", "uniform"]
    assert [(r.label, r.test_acc, r.val_acc) for r in cached] == [(r.label, r.test_acc, r.val_acc) for r in plain]
