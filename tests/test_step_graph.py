"""The training step as a CUDA graph (``cuda_graphs``): on a CPU its whole path runs rehearsed (static
buffers, copies, the lr as a tensor, one sums tensor; the step called where a GPU replays it) and
must train the eager step's numbers bit for bit; what cannot be recorded is said and runs eagerly; on a
CPU the option changes nothing; on a GPU (skipped without one) a graphed run matches an eager one."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from conftest import make_plan

from smskd_search.engine import LogitStore, RunOptions, Workbench, run_plan
from smskd_search.engine import stage as stage_module
from smskd_search.engine.device import pick_precision
from smskd_search.engine.step_graph import StepGraph, graph_blocker
from smskd_search.methods import METHODS
from smskd_search.plan import AugmentSpec, RecipeSpec

AUG = RecipeSpec(lr=0.05, batch_size=48, augment=AugmentSpec(crop_padding=1, flip=True))
PLAIN = RecipeSpec(lr=0.05, batch_size=48)
REF = {"weight_mode": "inverse", "lambda_ref": 1.5}


@pytest.fixture()
def rehearsed(monkeypatch):
    """Every stage gets a rehearsed graph (as a GPU run asking for CUDA graphs gets a recorded one)."""
    graphs: list[StepGraph] = []

    def step_graph(run, stage):
        why = graph_blocker(run.bench.device, run.bench.precision, stage.method, rehearse=True,
                            teacher_features_from_store=run.logit_store is not None and stage.method.teacher_features)
        if why is not None:
            return None
        graphs.append(StepGraph(run.bench.device, rehearse=True))
        return graphs[-1]

    monkeypatch.setattr(stage_module, "_step_graph", step_graph)
    return graphs


def _curve(result):
    return [(m.train_loss, m.train_ce, m.train_kd, m.train_ref, m.train_acc, m.val_acc, m.val_loss, m.lr)
            for s in result.stages for m in s.epoch_metrics]


def _weights(result):
    return {k: v.detach().clone() for k, v in result.student.state_dict().items()}


@pytest.mark.parametrize("recipe, stages, store", [
    (PLAIN, [("kd", 2), ("at", 1), ("dkd", 2)], False),  # precomputed teacher outputs gathered in the step
    (AUG, [("kd", 1), ("fitnet", 2)], False),  # the teacher's live forward in the step
    (AUG, [("dkd", 2), ("kd", 1)], True),  # the teacher's logits from the store, copied into the step
])
def test_the_rehearsed_graph_trains_the_eager_numbers_bit_for_bit(tiny_problem, shared, rehearsed, monkeypatch,
                                                                   tmp_path, recipe, stages, store):
    plan = make_plan(tiny_problem, stages, recipe=recipe, reference=REF)

    def run(**kw):
        return run_plan(plan, logit_store=LogitStore(tmp_path / "logits") if store else None, **shared, **kw)

    graphed = run()
    n_graphs = len(rehearsed)
    monkeypatch.setattr(stage_module, "_step_graph", lambda run, stage: None)
    eager = run()
    assert n_graphs == len(stages)
    # Past the 3 warm-up steps every full batch went through the graph, recorded once per epoch; the
    # short last batch of each epoch ran eagerly.
    full, short = divmod(shared["data"].info.num_train, 48)
    assert full > 3 and short > 0
    for g, (_, epochs) in zip(rehearsed, stages):
        assert (g.eager_steps, g.replays, g.recordings) == (3 + epochs, full * epochs - 3, epochs)
    assert _curve(graphed) == _curve(eager)
    a, b = _weights(graphed), _weights(eager)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    if store:
        assert graphed.teacher_epochs_served == 0 and eager.teacher_epochs_served == 3


def test_the_lr_is_a_float_in_the_optimizer_between_steps(tiny_problem, shared, rehearsed, monkeypatch):
    # Checkpoints, the stage cache and eager steps read param_groups: only the graph's step may see
    # the tensor, and its value is the schedule's.
    plan = make_plan(tiny_problem, [("kd", 2)], recipe=PLAIN)
    seen: list[tuple[type, float]] = []
    original = torch.optim.SGD.step

    def spy(self, *args, **kwargs):
        lr = self.param_groups[0]["lr"]
        seen.append((type(lr), float(lr)))
        return original(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.SGD, "step", spy)
    result = run_plan(plan, **shared)
    graph = rehearsed[0]
    tensor_steps = [lr for kind, lr in seen if kind is torch.Tensor]
    assert len(tensor_steps) == graph.replays and len(seen) - len(tensor_steps) == graph.eager_steps
    assert isinstance(graph._optimizer.param_groups[0]["lr"], float)  # noqa: SLF001 - after the run
    # Cosine within the stage: every step's lr differs from the one before, the graph's included.
    lrs = [lr for _, lr in seen]
    assert all(a > b for a, b in zip(lrs, lrs[1:])) and result.stages[0].epoch_metrics[-1].lr == lrs[-1]


def test_a_recording_that_fails_leaves_the_stage_to_the_eager_step(tiny_problem, shared, monkeypatch):
    # An op that cannot be recorded fails the recording (PyTorch raises at the capture); the batch and
    # the rest of the stage train eagerly, with the eager numbers, and the run says why.
    class Refused(StepGraph):
        def _record(self):
            if self.recordings == 1:  # the second epoch's recording
                raise RuntimeError("CUDA error: operation not permitted when stream is capturing")
            return super()._record()

    monkeypatch.setattr(stage_module, "_step_graph", lambda run, stage: Refused(run.bench.device, rehearse=True))
    plan = make_plan(tiny_problem, [("kd", 3)], recipe=AUG)
    graphed = run_plan(plan, **shared)
    monkeypatch.setattr(stage_module, "_step_graph", lambda run, stage: None)
    eager = run_plan(plan, **shared)
    assert _curve(graphed) == _curve(eager)
    assert graphed.notes == ["cuda_graphs: stage 1 (kd) went on eagerly from epoch 2: its step could not be recorded: "
                             "RuntimeError: CUDA error: operation not permitted when stream is capturing"]

    class OutOfMemory(StepGraph):
        def _record(self):
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(stage_module, "_step_graph", lambda run, stage: OutOfMemory(run.bench.device, rehearse=True))
    with pytest.raises(torch.OutOfMemoryError):  # a device fault stays the machine's: the trial is retried
        run_plan(plan, **shared)


def test_what_cannot_be_recorded_is_said_and_runs_eagerly():
    cpu = torch.device("cpu")
    prec = pick_precision(cpu)
    assert graph_blocker(cpu, prec, None, teacher_features_from_store=False) == "no CUDA device"
    assert graph_blocker(cpu, prec, None, teacher_features_from_store=False, rehearse=True) is None
    fp16 = pick_precision(cpu, "fp16")
    scaled = type(fp16)(fp16.autocast_dtype, True, False, "cpu")
    assert "grad scaling" in graph_blocker(cpu, scaled, None, teacher_features_from_store=False, rehearse=True)
    assert "logit store" in graph_blocker(cpu, prec, None, teacher_features_from_store=True, rehearse=True)
    # Methods with host work after the step (CRD's banks and sampled negatives) are refused by what
    # they override, so a new method with an on_step_end is refused too.
    refused = sorted(name for name, cls in METHODS.items() if cls.on_step_end is not METHODS["kd"].on_step_end)
    assert refused == ["crd"]


def test_on_a_cpu_the_option_changes_nothing_and_says_so(tiny_problem, shared):
    plan = make_plan(tiny_problem, [("kd", 1), ("dkd", 1)], recipe=PLAIN, reference=REF)
    bench = Workbench.open(plan.problem, device="cpu", data=shared["data"], teacher_record=shared["teacher_record"],
                           teacher=shared["teacher_model"])
    eager = run_plan(plan, bench, RunOptions())
    asked = run_plan(plan, bench, RunOptions(cuda_graphs=True))
    assert _curve(asked) == _curve(eager)
    assert asked.notes == ["cuda_graphs: no CUDA device, every step runs eagerly"] and eager.notes == []


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_on_a_gpu_a_graphed_run_gives_the_eager_numbers(tiny_problem, teacher_cache):
    plan = make_plan(tiny_problem, [("kd", 2), ("dkd", 2)], recipe=AUG, reference=REF)
    bench = Workbench.open(plan.problem, teacher_cache=teacher_cache, device="cuda")
    eager = run_plan(plan, bench, RunOptions())
    graphed = run_plan(plan, bench, RunOptions(cuda_graphs=True))
    assert not any(n.startswith("cuda_graphs") for n in graphed.notes)
    # The same kernels on the same memory: cuDNN's autotuner and atomics may still vary the last bits.
    for a, b in zip(_curve(eager), _curve(graphed)):
        assert a == pytest.approx(b, rel=1e-2, abs=1e-2)


def test_the_flag_reaches_every_trial_of_a_search(tiny_problem, shared, tmp_path):
    # --cuda-graphs -> SearchSettings -> the context every trial is handed -> its RunOptions.
    from smskd_search.cli import _search_parser, settings_from_flags
    from smskd_search.search.cluster import TrialResources
    from smskd_search.search.tune_run import TuneSettings, trial_context
    from smskd_search.space import Space

    on = settings_from_flags(_search_parser("x").parse_args(["--cuda-graphs"]))
    off = settings_from_flags(_search_parser("x").parse_args([]))
    resources = TrialResources(per_trial={"cpu": 1.0, "gpu": 0.25}, device="cuda", concurrent=4)
    space = Space(name="t", problem=tiny_problem)
    for settings in (on, off):
        session = SimpleNamespace(storage_root=str(tmp_path))
        tune = TuneSettings(settings, space, session=session, teacher=shared["teacher_record"])  # type: ignore[arg-type]
        assert trial_context(tune, resources).cuda_graphs is settings.cuda_graphs
    assert on.cuda_graphs and not off.cuda_graphs


def _teacher_problem(tiny_problem):
    """The tiny problem's teacher with augmentation and a batch that leaves a short last batch."""
    from smskd_search.plan import TeacherRecipe

    recipe = TeacherRecipe(epochs=2, lr=0.05, batch_size=48, augment=AugmentSpec(crop_padding=1, flip=True))
    return tiny_problem.model_copy(update={"teacher": tiny_problem.teacher.model_copy(update={"recipe": recipe})})


def _plain_teacher_loop(problem, data):
    """The teacher's loop as it was written before it went through the students' epoch (golden)."""
    import torch.nn.functional as F

    from smskd_search.engine.optim import backward_and_step, build_optimizer, lr_at, set_lr, step_progress, trainable
    from smskd_search.models import create_model

    recipe = problem.teacher.recipe
    torch.manual_seed(recipe.seed)
    model = create_model(problem.teacher.arch, data.info.num_classes, data.info.in_channels, data.info.image_size)
    opt = build_optimizer([{"params": trainable(model.parameters())}], recipe, torch.device("cpu"))
    loader = data.train.loader(recipe.batch_size, shuffle=True, augment=recipe.augment, seed=recipe.seed)
    losses = []
    for epoch in range(recipe.epochs):
        model.train()
        loss_sum = torch.zeros((), dtype=torch.float64)
        for step, (x, y, _) in enumerate(loader):
            set_lr(opt, lr_at(recipe.lr, recipe.schedule, step_progress(epoch, step, len(loader), recipe.epochs,
                                                                        recipe.schedule.kind)))
            logits, _ = model(x)
            loss = F.cross_entropy(logits.float(), y)
            backward_and_step(loss, opt, None)
            loss_sum += loss.detach().double() * y.shape[0]
        losses.append(loss_sum.item() / len(data.train))
    return model, losses


def test_the_teacher_trains_through_the_students_epoch_as_its_own_loop_did(tiny_problem, shared):
    """The teacher's loop is the students' epoch with CE alone (so its step can be graphed too); the
    teacher it trains is the one the plain loop trained, bit for bit (the cache keys stay valid)."""
    from smskd_search.engine.teacher import train_teacher_model

    problem, data = _teacher_problem(tiny_problem), shared["data"]
    losses = []
    model = train_teacher_model(problem, data, torch.device("cpu"), pick_precision(torch.device("cpu")),
                                on_epoch=lambda e, n, loss, acc: losses.append(loss))
    plain, plain_losses = _plain_teacher_loop(problem, data)
    assert losses == plain_losses and losses[1] < losses[0]
    a, b = model.state_dict(), plain.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_the_teachers_rehearsed_graph_trains_its_eager_numbers_bit_for_bit(tiny_problem, shared):
    from smskd_search.engine.teacher import train_teacher_model

    problem, data, cpu = _teacher_problem(tiny_problem), shared["data"], torch.device("cpu")
    runs = []
    for graph in (StepGraph(cpu, rehearse=True), None):
        losses: list[tuple[float, float]] = []
        # cuda_graphs on a CPU makes no graph: the second run is the eager one.
        model = train_teacher_model(problem, data, cpu, pick_precision(cpu), graph=graph, cuda_graphs=True,
                                    on_epoch=lambda e, n, loss, acc, out=losses: out.append((loss, acc)))
        runs.append((model.state_dict(), losses, graph))
    (graphed, g_losses, g), (eager, e_losses, _) = runs
    full, short = divmod(data.info.num_train, 48)
    assert full > 3 and short > 0
    assert (g.eager_steps, g.replays, g.recordings) == (3 + 2, full * 2 - 3, 2)
    assert g_losses == e_losses
    assert all(torch.equal(graphed[k], eager[k]) for k in eager)


def test_the_teachers_rehearsed_forward_graph_gives_its_eager_logits(shared):
    from smskd_search.data import TensorLoader
    from smskd_search.engine.frozen import FrozenForward
    from smskd_search.engine.step_graph import ForwardGraph

    cpu = torch.device("cpu")
    forward = FrozenForward(shared["teacher_model"], pick_precision(cpu, "auto"))
    graphed = ForwardGraph(forward, cpu, rehearse=True)
    loader = TensorLoader(shared["data"].train, 48, shuffle=True, augment=AUG.augment,
                          generator=torch.Generator().manual_seed(0))
    outs = [(graphed(x, idx)[0], forward(x, idx)[0]) for x, _, idx in loader]
    assert all(torch.equal(a, b) for a, b in outs)
    # 3 eager warm-up calls, then every full batch through the recorded path; the short last one eagerly.
    full, short = divmod(shared["data"].info.num_train, 48)
    assert short > 0 and (graphed.calls, graphed.replays) == (full + 1, full - 3)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_on_a_gpu_the_graphed_teacher_pass_gives_the_eager_logits(shared):
    from smskd_search.data import TensorLoader
    from smskd_search.engine.frozen import FrozenForward
    from smskd_search.engine.logit_store import TeacherPass
    from smskd_search.engine.step_graph import ForwardGraph

    gpu = torch.device("cuda:0")
    model = shared["teacher_model"].to(gpu)
    forward = FrozenForward(model, pick_precision(gpu, "auto"))
    split = shared["data"].train.to(gpu)

    def entry(graph):
        loader = TensorLoader(split, 48, shuffle=True, augment=AUG.augment, generator=torch.Generator(gpu).manual_seed(0))
        ahead = TeacherPass(ForwardGraph(forward, gpu) if graph else forward, loader, device=gpu)
        got = ahead(0, len(loader))
        ahead.close()
        return got

    eager, graphed = entry(False), entry(True)
    assert torch.equal(eager.indices, graphed.indices) and torch.equal(eager.checks, graphed.checks)
    assert torch.allclose(eager.logits.float(), graphed.logits.float(), rtol=1e-2, atol=1e-2)
