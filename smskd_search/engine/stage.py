"""One stage of a run: build it, go on from a partial entry, train it (each epoch then a validation
pass), keep it.

A stage reseeds itself from the plan's seed and its index, builds its method's modules from the
probed shapes, and (from the second stage on) a reference: the previous stage's student, frozen.
It gets a fresh optimizer and a restarted lr schedule unless the plan carries one over all stages.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from smskd_search.data import BatchLoader
from smskd_search.engine.checkpoints import made_on, partial_payload, stage_payload
from smskd_search.engine.device import device_rng_state, set_device_rng_state
from smskd_search.engine.evaluate import evaluate
from smskd_search.engine.events import EpochsReused, EpochTrained, EventSink
from smskd_search.engine.frozen import FrozenForward, frozen_copy
from smskd_search.engine.logit_store import EpochTeacher, LogitStore, PartLoader, StoreMismatch, TeacherPass
from smskd_search.engine.optim import build_optimizer, trainable
from smskd_search.engine.prefix_cache import Runtime
from smskd_search.engine.results import Diverged, EpochMetrics, StageResult, stage_result_from_dict
from smskd_search.engine.stage_store import Slot, StageStore
from smskd_search.engine.step_graph import ForwardGraph, StepGraph, graph_blocker
from smskd_search.engine.trainer import ReferenceTerm, Schedule, TeacherForward, train_epoch
from smskd_search.engine.workbench import Workbench
from smskd_search.methods import Method, MethodContext, build_method
from smskd_search.models import FeatureShapes
from smskd_search.plan import Plan, StageSpec


def stage_seed(plan_seed: int, stage_index: int) -> int:
    # Each stage draws from its own seeded streams, so a resumed run replays them exactly.
    return plan_seed * 1_000_003 + stage_index


@dataclass
class RunState:
    """What the stages of one run share; ``student``, ``optimizer`` and ``results`` carry on."""

    plan: Plan
    bench: Workbench
    emit: EventSink
    student: nn.Module
    s_shapes: FeatureShapes
    t_shapes: FeatureShapes
    teacher_fw: FrozenForward
    cache_inputs: torch.Tensor | None
    scaler: Any
    runtime: Runtime
    logit_store: LogitStore | None = None
    notes: list[str] = field(default_factory=list)
    teacher_epochs_served: float = 0.0  # a fraction where other processes computed parts of an epoch
    results: list[StageResult] = field(default_factory=list)
    resumed_from: int | None = None
    opt_state: dict | None = None
    optimizer: torch.optim.Optimizer | None = None
    cuda_graphs: bool = False  # record each stage's step as a CUDA graph where it can be
    # The teacher's recorded forward for its passes over the parts of epochs, by stage (cuda_graphs).
    pass_graphs: dict[int, ForwardGraph] = field(default_factory=dict)

    @property
    def cum_epochs(self) -> int:
        return self.results[-1].cum_epochs if self.results else 0

    def made_on(self) -> dict[str, str]:
        return made_on(self.bench.device, self.bench.precision, self.runtime)

    def checkpoint(self, k: int) -> dict:
        """The payload of stage k's checkpoint (and of its stage-cache entry)."""
        carried = None if self.plan.restart_optimizer else self.optimizer
        return stage_payload(plan_hash=self.plan.content_hash(), stage_index=k, student=self.student,
                             optimizer=carried, where=self.made_on(), results=self.results[: k + 1])


@dataclass
class Stage:
    """One stage being trained: its method's modules, the reference, the batches, the schedule."""

    index: int
    spec: StageSpec
    seed: int
    method: Method
    reference: ReferenceTerm | None
    loader: BatchLoader
    schedule: Schedule | None = None


def build_stage(run: RunState, k: int) -> Stage:
    """Stage k's method (modules built from the probed shapes), reference (the student so far,
    frozen), seeded batches, and optimizer with its lr schedule."""
    plan, bench = run.plan, run.bench
    info = bench.data.info
    spec = plan.stages[k]
    seed = stage_seed(plan.seed, k)
    torch.manual_seed(seed)
    ctx = MethodContext(run.s_shapes, run.t_shapes, bench.teacher, info.num_classes, info.num_train,
                        bench.data.train.labels)
    method = build_method(spec.method, spec.params, ctx).to(bench.device)
    reference = None
    if k > 0:
        ref_model = bench.precision.prepare_model(frozen_copy(run.student))
        ref_fw = FrozenForward(ref_model, bench.precision, run.cache_inputs if plan.reference.lambda_ref > 0 else None,
                               plan.recipe.eval_batch_size, need_features=plan.reference.loss == "feature_mse")
        reference = ReferenceTerm(ref_fw, plan.reference)
    loader = bench.data.train.loader(plan.recipe.batch_size, shuffle=True, augment=plan.recipe.augment, seed=seed)
    stage = Stage(k, spec, seed, method, reference, loader)
    _stage_optimizer(run, stage)
    return stage


def _stage_optimizer(run: RunState, stage: Stage) -> None:
    """A fresh optimizer and lr schedule for the stage, or the run's one carried on."""
    plan = run.plan
    student_params = trainable(run.student.parameters())
    method_params = trainable(stage.method.parameters())
    if plan.restart_optimizer or run.optimizer is None:
        run.optimizer = build_optimizer([{"params": student_params}], plan.recipe, run.bench.device)
        if not plan.restart_optimizer and run.opt_state is not None:
            run.optimizer.load_state_dict(run.opt_state)  # resumed: the student's momentum carries on
    else:
        # One optimizer over the run: the student keeps its momentum; the previous method's
        # modules leave with their state, the new method's join as a fresh group.
        for group in run.optimizer.param_groups[1:]:
            for p in group["params"]:
                run.optimizer.state.pop(p, None)
        del run.optimizer.param_groups[1:]
    if method_params:
        run.optimizer.add_param_group({"params": method_params})
    stage.schedule = Schedule(
        base_lr=plan.recipe.lr,
        spec=plan.recipe.schedule,
        span_epochs=stage.spec.epochs if plan.restart_optimizer else plan.total_epochs,
        epoch_offset=0 if plan.restart_optimizer else run.cum_epochs,
    )


def _rng_states(run: RunState, stage: Stage) -> dict[str, Any]:
    # A tensor loader's is its generator's state (as ever); a streaming loader's, its epoch and seed.
    return {"loader_rng": stage.loader.random_state(), "torch_rng": torch.get_rng_state(),
            "cuda_rng": device_rng_state(run.bench.device)}


def _set_rng_states(run: RunState, stage: Stage, states: dict[str, Any]) -> None:
    stage.loader.set_random_state(states["loader_rng"])
    torch.set_rng_state(states["torch_rng"])
    set_device_rng_state(run.bench.device, states["cuda_rng"])


def go_on_from_partial(run: RunState, stage: Stage, store: StageStore, slots: list[Slot]) -> StageResult | None:
    """Load the stage's latest partial entry into the student, the method, the optimizer and the
    random streams, and emit its epochs (:class:`EpochsReused`); returns the stage's result so far,
    or None (nothing found: everything as it was)."""
    assert run.optimizer is not None
    for slot in reversed(slots):
        entry = store.get(slot)
        if entry is None:
            continue
        before = (copy.deepcopy(run.student.state_dict()), copy.deepcopy(stage.method.state_dict()),
                  copy.deepcopy(run.optimizer.state_dict()), _rng_states(run, stage))
        try:
            result = stage_result_from_dict(entry["stage"])
            if (entry.get("kind") != "partial_stage" or entry["epochs_done"] != slot.epochs_done
                    or len(result.epoch_metrics) != slot.epochs_done or result.index != stage.index):
                raise ValueError("not this stage's partial entry")
            run.student.load_state_dict(entry["student"])
            stage.method.load_state_dict(entry["method"])
            run.optimizer.load_state_dict(entry["optimizer"])
            _set_rng_states(run, stage, entry)
            result.epochs = stage.spec.epochs  # the entry may come from a stage of another length
        except (KeyError, TypeError, ValueError, RuntimeError):
            # Not an entry this engine wrote: put everything back and train the stage from its start.
            run.student.load_state_dict(before[0])
            stage.method.load_state_dict(before[1])
            run.optimizer.load_state_dict(before[2])
            _set_rng_states(run, stage, before[3])
            continue
        run.emit(EpochsReused(stage.index, list(result.epoch_metrics)))
        return result
    return None


def train_stage(run: RunState, stage: Stage, store: StageStore, slots: list[Slot],
                start: StageResult | None = None) -> StageResult:
    """The stage's epochs (those after ``start``'s), each followed by a validation pass and an
    :class:`EpochTrained` event, and, at the epochs of ``slots``, by a put of the stage so far;
    stops at a non-finite loss.

    Raises:
        Diverged: The training loss went non-finite.
    """
    assert run.optimizer is not None and stage.schedule is not None
    bench = run.bench
    result = start if start is not None else StageResult(
        stage.index, stage.spec.method, stage.spec.epochs, run.cum_epochs, 0.0, 0.0, bench.data.info.num_val,
        stage.reference is not None and stage.reference.active)
    put_after = {slot.epochs_done: slot for slot in slots}
    cum_epochs = run.cum_epochs + len(result.epoch_metrics)
    graph = _step_graph(run, stage)
    for e in range(len(result.epoch_metrics), stage.spec.epochs):
        teacher, store_key = _epoch_teacher(run, stage, store, e)
        stats = train_epoch(student=run.student, method=stage.method, teacher=teacher,
                            reference=stage.reference, loader=stage.loader, optimizer=run.optimizer,
                            schedule=stage.schedule, stage_epoch=e, precision=bench.precision, scaler=run.scaler,
                            graph=graph)
        if isinstance(teacher, EpochTeacher):
            _finish_epoch_teacher(run, teacher, store_key)
        if graph is not None and graph.failed is not None:
            run.notes.append(f"cuda_graphs: stage {stage.index + 1} ({stage.spec.method}) went on eagerly from "
                             f"epoch {e + 1}: its step could not be recorded: {graph.failed}")
            graph = None
        if not math.isfinite(stats.loss):
            raise Diverged(f"diverged: non-finite loss at stage {stage.index + 1}, epoch {e + 1}")
        cum_epochs += 1
        val = evaluate(run.student, bench.data.val, bench.precision, run.plan.recipe.eval_batch_size)
        em = EpochMetrics(e + 1, cum_epochs, stats.loss, stats.ce, stats.kd, stats.ref, stats.acc,
                          stats.lr, val.acc, val.loss)
        result.epoch_metrics.append(em)
        if e + 1 in put_after:  # before the event: a search may stop the run inside it
            store.put(put_after[e + 1], partial_payload(stage_index=stage.index, result=result, student=run.student,
                                                        method=stage.method, optimizer=run.optimizer,
                                                        rng=_rng_states(run, stage)))
        run.emit(EpochTrained(stage.index, em))
    last = result.epoch_metrics[-1]
    result.cum_epochs, result.val_acc, result.val_loss = cum_epochs, last.val_acc, last.val_loss
    return result


def _step_graph(run: RunState, stage: Stage) -> StepGraph | None:
    """The stage's recorded step where the run asks for CUDA graphs and the stage allows one (else
    None, and a note of why)."""
    if not run.cuda_graphs:
        return None
    bench = run.bench
    why = graph_blocker(bench.device, bench.precision, stage.method,
                        teacher_features_from_store=run.logit_store is not None and stage.method.teacher_features)
    if why is not None:
        run.notes.append(f"cuda_graphs: stage {stage.index + 1} ({stage.spec.method}) runs eagerly: {why}")
        return None
    return StepGraph(bench.device)


def _epoch_teacher(run: RunState, stage: Stage, keys: StageStore, epoch: int) -> tuple[TeacherForward, str]:
    """The teacher's forward for this epoch: through the logit store where the run has one."""
    if run.logit_store is None:
        return run.teacher_fw, ""
    bench = run.bench
    key = keys.logits_key(stage.index, epoch, loader_seed=stage.seed, train_shape=bench.data.train.shape)
    store, need_features = run.logit_store, stage.method.teacher_features
    if need_features:
        # The forward runs anyway: its logits are put only where the store lacks them (not loaded).
        return EpochTeacher(run.teacher_fw, None, need_features=True, device=bench.device, record=not store.has(key),
                            round_to=store.dtype), key
    if not isinstance(stage.loader, PartLoader):  # (streamed splits have no store: no such loader here)
        return EpochTeacher(run.teacher_fw, store.get(key), need_features=False, device=bench.device,
                            round_to=store.dtype), key
    forward: Any = run.teacher_fw
    if run.cuda_graphs:  # one recording of the teacher's forward for the stage's passes
        forward = run.pass_graphs.setdefault(stage.index, ForwardGraph(run.teacher_fw, bench.device))
    ahead = TeacherPass(forward, stage.loader, device=bench.device, round_to=store.dtype)
    try:
        entry, share = store.shared(key, len(stage.loader), ahead)
    finally:
        ahead.close()
    if isinstance(forward, ForwardGraph) and forward.failed is not None and not forward.noted:
        forward.noted = True
        run.notes.append(f"cuda_graphs: stage {stage.index + 1}'s teacher pass runs eagerly: its forward could not "
                         f"be recorded: {forward.failed}")
    teacher = EpochTeacher(run.teacher_fw, entry, need_features=False, device=bench.device, round_to=store.dtype)
    teacher.computed_share = share
    return teacher, key


def _finish_epoch_teacher(run: RunState, teacher: EpochTeacher, key: str) -> None:
    """Check a served epoch against its batches, or put the logits the epoch computed."""
    assert run.logit_store is not None
    try:
        recorded = teacher.finish()
    except StoreMismatch:
        run.logit_store.discard(key)  # never served again
        raise
    if teacher.serving:
        run.teacher_epochs_served += 1.0 - teacher.computed_share
        run.logit_store.served += 1.0 - teacher.computed_share
    elif recorded is not None:
        run.logit_store.put(key, recorded)
