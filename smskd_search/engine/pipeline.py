"""``run_plan``: one SMSKD pipeline, stage by stage.

Stage 1 trains with CE + its method's loss. At each stage end the student is evaluated on the
validation split, checkpointed, and copied into a frozen reference (eval mode, no gradients); the
method's extra modules are dropped; the next stage builds its own from probed shapes, with a fresh
optimizer and a restarted lr schedule unless the plan says otherwise. From stage 2 on, the loss adds
``lambda_ref * mean_i(w_i * tau^2 * KL(ref || student))`` with TCP weights ``w_i``.

Given a stage-prefix cache (:mod:`~smskd_search.engine.prefix_cache`), a run starts from the longest
prefix of its stages stored there and puts every stage it trains; the numbers are those of a run
from scratch (each stage reseeds itself from the plan's seed and its index). Asked to (``partial_at``,
the search's rungs), it also puts a stage's state part-way through (student, the method's modules,
optimizer, random streams), and goes on from such an entry when a stage it must train has one. Given a teacher-logit
store (:mod:`~smskd_search.engine.logit_store`), an epoch on augmented batches whose method reads
only the teacher's logits takes them from the store when another run put them, with the same
numbers, and every epoch that ran the teacher forward puts its logits there.

Neither Ray nor Optuna is imported here: a plan runs wherever torch runs.
"""

from __future__ import annotations

import copy
import json
import math
from collections.abc import Callable, Collection
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn

from smskd_search.data import DataInfo, DataSplits, TensorLoader, load_data, load_test_split
from smskd_search.engine.device import (
    Precision,
    device_name,
    device_rng_state,
    make_generator,
    pick_device,
    pick_precision,
    set_device_rng_state,
    set_numerics,
)
from smskd_search.engine.evaluate import EvalResult, evaluate
from smskd_search.engine.frozen import FrozenForward, freeze, frozen_copy
from smskd_search.engine.logit_store import EpochTeacher, LogitStore, StoreMismatch, teacher_logits_key
from smskd_search.engine.optim import build_optimizer, trainable
from smskd_search.engine.prefix_cache import (
    FrozenOutputsMemo,
    PrefixCache,
    Runtime,
    cacheable,
    frozen_outputs_key,
    partial_stage_key,
    shared_across_lengths,
    stage_prefix_key,
)
from smskd_search.engine.teacher import DEFAULT_CACHE, TeacherRecord, ensure_teacher, load_teacher
from smskd_search.engine.trainer import ReferenceTerm, Schedule, TeacherForward, train_epoch
from smskd_search.errors import UserError
from smskd_search.methods import Method, MethodContext, build_method
from smskd_search.models import FeatureShapes, create_model, probe_shapes
from smskd_search.plan import Plan, StageSpec
from smskd_search.validate import check_plan

CHECKPOINT_VERSION = 1


@dataclass
class EpochMetrics:
    epoch: int  # 1-based within the stage
    cum_epochs: int
    train_loss: float
    train_ce: float
    train_kd: float
    train_ref: float
    train_acc: float
    lr: float
    val_acc: float
    val_loss: float


@dataclass
class StageResult:
    """One finished stage: its validation accuracy (with n) at the stage end, and its curve."""

    index: int  # 0-based
    method: str
    epochs: int
    cum_epochs: int
    val_acc: float
    val_loss: float
    n_val: int
    reference_active: bool
    epoch_metrics: list[EpochMetrics] = field(default_factory=list)
    # True when this run took the stage from the stage-prefix cache instead of training it.
    reused: bool = False


@dataclass
class RunResult:
    """What :func:`run_plan` returns: the stages' results, the teacher used, the student if kept."""

    plan_hash: str
    stages: list[StageResult]
    stopped_early: bool
    resumed_from_stage: int | None
    teacher: TeacherRecord
    data_info: DataInfo
    student: nn.Module | None = None
    # Epochs of this run: taken from the stage cache, trained, and taken from its own checkpoint.
    epochs_reused: int = 0
    epochs_trained: int = 0
    epochs_resumed: int = 0
    # Why the stage cache was not used although one was given (None: used, or none given).
    cache_skipped: str | None = None
    # Trained epochs whose teacher logits came from the logit store (no teacher forward).
    teacher_epochs_served: int = 0
    # What the caller should say (a resume from a checkpoint made on another device or precision).
    notes: list[str] = field(default_factory=list)

    @property
    def final_val_acc(self) -> float:
        return self.stages[-1].val_acc

    def to_dict(self) -> dict:
        return {
            "plan_hash": self.plan_hash,
            "stages": [asdict(s) for s in self.stages],
            "stopped_early": self.stopped_early,
            "resumed_from_stage": self.resumed_from_stage,
            "teacher": asdict(self.teacher),
            "epochs_reused": self.epochs_reused,
            "epochs_trained": self.epochs_trained,
            "epochs_resumed": self.epochs_resumed,
        }


class StageCallback(Protocol):
    def __call__(self, stage_index: int, cum_epochs: int, result: StageResult, checkpoint: Path | None) -> bool | None:
        """Return True to stop the run after this stage (the search prunes through this)."""


EpochCallback = Callable[[int, EpochMetrics], None]
# (stage index, the epochs of that stage taken from a partial cache entry instead of trained)
EpochsReusedCallback = Callable[[int, list[EpochMetrics]], None]


def checkpoint_path(out_dir: Path, stage_index: int) -> Path:
    return out_dir / f"stage{stage_index + 1}.pt"


class UnsafeCheckpoint(UserError):
    """A stage checkpoint that does not load as tensors and plain data (``weights_only=True``)."""


def _stage_checkpoints(out_dir: Path) -> list[Path]:
    return sorted(out_dir.glob("stage*.pt"), key=lambda p: int(p.stem[5:]) if p.stem[5:].isdigit() else -1)


def load_checkpoint(path: Path) -> dict:
    """A stage checkpoint, unpickled with ``weights_only=True``: tensors and plain data only, so a
    file that would need to run code to load is refused, never executed.

    Raises:
        UnsafeCheckpoint: The file holds anything else (an older format, a foreign file).
    """
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - an unpickling error, a truncated or foreign file: one answer
        why = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UnsafeCheckpoint(f"stage checkpoint {path} does not load as tensors and plain data "
                               f"(weights_only=True): {why[:200]}; delete it to train that stage again") from None
    if not isinstance(ckpt, dict) or "plan_hash" not in ckpt:
        raise UnsafeCheckpoint(f"stage checkpoint {path} is not a stage checkpoint of smskd-search; delete it")
    return ckpt


def discard_unsafe_checkpoints(out_dir: Path) -> list[Path]:
    """Remove the stage checkpoints in ``out_dir`` that :func:`load_checkpoint` refuses; returns them.

    A search's trial calls this before resuming from its folder: the stages are trained again.
    """
    dropped = []
    for p in _stage_checkpoints(out_dir):
        try:
            load_checkpoint(p)
        except UnsafeCheckpoint:
            p.unlink(missing_ok=True)
            dropped.append(p)
    return dropped


def latest_checkpoint(out_dir: Path, plan_hash: str) -> dict | None:
    """The last stage checkpoint of this plan in ``out_dir``, or None.

    Raises:
        UnsafeCheckpoint: A checkpoint there does not load with ``weights_only=True``.
    """
    for p in reversed(_stage_checkpoints(out_dir)):
        ckpt = load_checkpoint(p)
        if ckpt.get("plan_hash") == plan_hash:
            return ckpt
    return None


def _save_checkpoint(path: Path, payload: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".pt.tmp")
    torch.save(payload, tmp)
    tmp.replace(path)  # atomic: a killed run never leaves half a checkpoint


def _stage_seed(plan_seed: int, stage_index: int) -> int:
    # Each stage draws from its own seeded streams, so a resumed run replays them exactly.
    return plan_seed * 1_000_003 + stage_index


class Diverged(UserError):
    """The training loss went non-finite: the plan fails (``train`` exits with the message, a search
    records the trial as FAIL with it as the reason)."""


@dataclass
class _Run:
    """What the stages of one run share; ``student``, ``optimizer`` and ``results`` carry on."""

    plan: Plan
    dev: torch.device
    prec: Precision
    data: DataSplits
    teacher_record: TeacherRecord
    teacher_model: nn.Module
    teacher_fw: FrozenForward
    student: nn.Module
    s_shapes: FeatureShapes
    t_shapes: FeatureShapes
    cache_inputs: torch.Tensor | None
    scaler: Any
    runtime: Runtime
    logit_store: LogitStore | None = None
    notes: list[str] = field(default_factory=list)
    teacher_epochs_served: int = 0
    results: list[StageResult] = field(default_factory=list)
    start_stage: int = 0
    resumed_from: int | None = None
    opt_state: dict | None = None
    optimizer: torch.optim.Optimizer | None = None

    @property
    def cum_epochs(self) -> int:
        return self.results[-1].cum_epochs if self.results else 0


@dataclass
class _Stage:
    """One stage being trained: its method's modules, the reference, the batches, the schedule."""

    index: int
    spec: StageSpec
    seed: int
    method: Method
    reference: ReferenceTerm | None
    loader: TensorLoader
    schedule: Schedule | None = None


def run_plan(
    plan: Plan,
    *,
    device: torch.device | str | None = None,
    precision: str = "auto",
    out_dir: str | Path | None = None,
    resume: bool = False,
    on_stage_end: StageCallback | None = None,
    on_epoch_end: EpochCallback | None = None,
    teacher_cache: str | Path = DEFAULT_CACHE,
    data: DataSplits | None = None,
    teacher_model: nn.Module | None = None,
    teacher_record: TeacherRecord | None = None,
    cache_frozen_outputs: bool = True,
    keep_student: bool = True,
    stage_cache: PrefixCache | None = None,
    frozen_memo: FrozenOutputsMemo | None = None,
    logit_store: LogitStore | None = None,
    partial_at: Collection[int] = (),
    on_epochs_reused: EpochsReusedCallback | None = None,
    deterministic: bool = False,
) -> RunResult:
    """Run a plan stage by stage; see the module docstring for the exact semantics.

    Args:
        plan: The plan (checked for known models, methods and parameters first).
        device: ``"cpu"``, ``"cuda"``... (default: CUDA where there is one).
        precision: ``"auto"``, ``"fp32"``, ``"bf16"`` or ``"fp16"``.
        out_dir: Where stage checkpoints go (``stage{k}.pt``); None: no checkpoints.
        resume: Continue from the last checkpoint of this plan in ``out_dir``.
        on_stage_end: Called after each stage with its result and checkpoint; True stops the run.
        on_epoch_end: Called after each epoch with its metrics.
        teacher_cache: The teacher cache folder (the teacher trains once per problem).
        data, teacher_model, teacher_record: Shared across runs when given (the search does so).
        cache_frozen_outputs: Precompute the teacher's and the reference's outputs when training
            batches are not augmented (the same results, cheaper steps).
        keep_student: Keep the trained student in the result (for :func:`evaluate_test`).
        stage_cache: The stage-prefix cache (:mod:`~smskd_search.engine.prefix_cache`): the run
            starts from the longest prefix of its stages found there (when that goes further than
            its own checkpoint) and trains only the rest, with the same numbers; every finished
            stage is put there. Such stages are passed to ``on_stage_end`` too, with ``reused`` set
            (the last one with its checkpoint); ``on_epoch_end`` sees trained epochs only.
        frozen_memo: Keeps the frozen teacher's outputs over the training split across runs.
        logit_store: Keeps the teacher's logits per epoch of augmented batches across runs; an epoch
            of a method that reads only the teacher's logits (KD, DKD, CE) takes them from there.
            Unused where batches are not augmented (the teacher is precomputed over the split).
        partial_at: Cumulative epochs (the search's rungs) at which a stage still under way is put
            in ``stage_cache`` (:func:`~smskd_search.engine.prefix_cache.partial_stage_key`), so that
            a trial stopped there leaves its stage reusable. A stage to be trained that has such an
            entry goes on from its latest one, with the same numbers as from its start.
        on_epochs_reused: Called with a stage's epochs taken from such an entry (before the stage
            trains the rest), so that a caller can report them as it reports trained epochs.
        deterministic: On a GPU, PyTorch's deterministic algorithms (no TF32, no cuDNN autotuner):
            the same plan and seed then give the same bits there too, at a cost in speed. Without
            it, GPU runs agree closely, not bitwise. (A CPU run is bit-reproducible either way.)

    Returns:
        The :class:`RunResult`: per-stage validation accuracy and curves.

    Raises:
        UserError: The plan names an unknown model or method, or its teacher does not match.
        Diverged: The training loss went non-finite ("diverged: non-finite loss at stage k, epoch e").

    Example:

        >>> from smskd_search import load_space, make_plan, run_plan
        >>> plan = make_plan(load_space("default"), [("kd", 2), ("dkd", 2)])
        >>> result = run_plan(plan)  # doctest: +SKIP
        >>> [round(s.val_acc, 3) for s in result.stages]  # doctest: +SKIP
        [0.801, 0.857]
    """
    check_plan(plan)
    run = _set_up(plan, device, precision, data, teacher_record, teacher_model, teacher_cache, cache_frozen_outputs,
                  frozen_memo, deterministic)
    if logit_store is not None and not run.teacher_fw.cached:
        run.logit_store = logit_store
    logits_tag = run.logit_store.tag if run.logit_store is not None else "exact"
    out = Path(out_dir) if out_dir is not None else None
    if resume and out is not None:
        _resume(run, out)
    epochs_resumed = run.cum_epochs
    skipped = cacheable(plan, run.prec) if stage_cache is not None else None
    keys = ([stage_prefix_key(plan, k, teacher_sha256=run.teacher_record.sha256, runtime=run.runtime,
                              teacher_logits=logits_tag)
             for k in range(len(plan.stages))] if stage_cache is not None and skipped is None else None)
    reused_until = _from_stage_cache(run, stage_cache, keys) if stage_cache is not None and keys else run.start_stage
    stopped = False
    trained = partly_reused = 0
    for k in range(run.start_stage, len(plan.stages)):
        if k < reused_until:
            result = run.results[k]
            ckpt_file = _save_stage(run, k, out) if out is not None and k + 1 == reused_until else None
        else:
            stage = _build_stage(run, k)
            _stage_optimizer(run, stage)
            partial_keys = (_partial_keys(run, k, partial_at, logits_tag)
                            if stage_cache is not None and keys is not None else {})
            start = _from_partial(run, stage, stage_cache, partial_keys) if stage_cache is not None else None
            done = len(start.epoch_metrics) if start is not None else 0
            if start is not None:
                partly_reused += done
                if on_epochs_reused is not None:
                    on_epochs_reused(k, list(start.epoch_metrics))

            # The stage comes in as an argument, not through the closure, so that nothing holds it
            # (its method and reference with their precomputed outputs) once `del stage` below runs.
            def put_partial(stage: _Stage, result: StageResult, partial_keys: dict = partial_keys) -> None:
                assert stage_cache is not None
                stage_cache.put(partial_keys[len(result.epoch_metrics)], _partial_payload(run, stage, result))

            result = _train_stage(run, stage, on_epoch_end, start=start, save_after=set(partial_keys),
                                  put_partial=put_partial)
            del put_partial, start
            trained += result.epochs - done
            run.results.append(result)
            ckpt_file = _save_stage(run, k, out) if out is not None else None
            del stage  # the stage's extra modules and reference go with it
            if stage_cache is not None and keys is not None:
                if stage_cache.put(keys[k], _stage_payload(run, k)) is not None:
                    # The finished stage's entry answers for its partial ones now, unless a stage of
                    # another length can go on from them (a step or wsd schedule before its decay).
                    for done, key in partial_keys.items():
                        if not shared_across_lengths(plan.recipe.schedule, plan.stages[k].epochs, done):
                            stage_cache.discard(key)
        wants_stop = on_stage_end is not None and on_stage_end(k, result.cum_epochs, result, ckpt_file)
        if wants_stop and k + 1 < len(plan.stages):
            stopped = True
            break
    reused = sum(r.epochs for r in run.results if r.reused) + partly_reused
    return RunResult(plan.content_hash(), run.results, stopped, run.resumed_from, run.teacher_record, run.data.info,
                     run.student if keep_student else None, epochs_reused=reused, epochs_trained=trained,
                     epochs_resumed=epochs_resumed, cache_skipped=skipped,
                     teacher_epochs_served=run.teacher_epochs_served, notes=run.notes)


def _from_stage_cache(run: _Run, cache: PrefixCache, keys: list[str]) -> int:
    """Load the longest cached prefix that goes further than the run's own checkpoint; returns the
    number of stages the run then has (``run.start_stage`` when nothing was found)."""
    for k in range(len(keys) - 1, run.start_stage - 1, -1):
        entry = cache.get(keys[k])
        if entry is None:
            continue
        try:
            results = [_stage_result_from_dict(d) for d in entry["results"]]
            run.student.load_state_dict(entry["student"])
        except (KeyError, TypeError, RuntimeError):
            continue  # not an entry this engine wrote: train instead
        for r in results[run.start_stage:]:
            r.reused = True
        run.results = run.results[: run.start_stage] + results[run.start_stage:]
        return k + 1
    return run.start_stage


def _partial_keys(run: _Run, k: int, partial_at: Collection[int], logits_tag: str) -> dict[int, str]:
    """{epochs done: key} of stage k's partial entries at the cumulative epochs inside the stage."""
    before, epochs = run.cum_epochs, run.plan.stages[k].epochs
    return {c - before: partial_stage_key(run.plan, k, c - before, teacher_sha256=run.teacher_record.sha256,
                                          runtime=run.runtime, teacher_logits=logits_tag)
            for c in sorted(set(partial_at)) if before < c < before + epochs}


def _rng_states(run: _Run, stage: _Stage) -> dict[str, Any]:
    return {"loader_rng": stage.loader.generator.get_state(), "torch_rng": torch.get_rng_state(),
            "cuda_rng": device_rng_state(run.dev)}


def _set_rng_states(run: _Run, stage: _Stage, states: dict[str, Any]) -> None:
    stage.loader.generator.set_state(states["loader_rng"])
    torch.set_rng_state(states["torch_rng"])
    set_device_rng_state(run.dev, states["cuda_rng"])


def _partial_payload(run: _Run, stage: _Stage, result: StageResult) -> dict:
    """Stage ``stage`` after ``len(result.epoch_metrics)`` epochs: all that its next epoch reads."""
    assert run.optimizer is not None
    return {
        "version": CHECKPOINT_VERSION,
        "kind": "partial_stage",
        "stage_index": stage.index,
        "epochs_done": len(result.epoch_metrics),
        "student": {n: t.detach().cpu() for n, t in run.student.state_dict().items()},
        "method": {n: t.detach().cpu() for n, t in stage.method.state_dict().items()},
        "optimizer": _on_cpu(run.optimizer.state_dict()),
        **_rng_states(run, stage),
        "stage": asdict(result),
    }


def _from_partial(run: _Run, stage: _Stage, cache: PrefixCache, keys: dict[int, str]) -> StageResult | None:
    """Load the stage's latest partial entry into the student, the method, the optimizer and the
    random streams; returns the stage's result so far (its epochs' metrics), or None (nothing found:
    everything as it was)."""
    assert run.optimizer is not None
    for done in sorted(keys, reverse=True):
        entry = cache.get(keys[done])
        if entry is None:
            continue
        before = (copy.deepcopy(run.student.state_dict()), copy.deepcopy(stage.method.state_dict()),
                  copy.deepcopy(run.optimizer.state_dict()), _rng_states(run, stage))
        try:
            result = _stage_result_from_dict(entry["stage"])
            if (entry.get("kind") != "partial_stage" or entry["epochs_done"] != done
                    or len(result.epoch_metrics) != done or result.index != stage.index):
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
        return result
    return None


def _set_up(plan: Plan, device: torch.device | str | None, precision: str, data: DataSplits | None,
            teacher_record: TeacherRecord | None, teacher_model: nn.Module | None, teacher_cache: str | Path,
            cache_frozen_outputs: bool, frozen_memo: FrozenOutputsMemo | None = None,
            deterministic: bool = False) -> _Run:
    """Data, the teacher (checked against the plan), a fresh student and the shapes methods probe."""
    dev = pick_device(device)
    prec = pick_precision(dev, precision)
    set_numerics(dev, prec, deterministic)
    if data is None:
        data = load_data(plan.problem.dataset, dev)
    info = data.info
    if teacher_record is None:
        teacher_record = ensure_teacher(plan.problem, cache_root=teacher_cache, device=dev, data=data)
    if plan.teacher_sha256 and plan.teacher_sha256 != teacher_record.sha256:
        raise UserError(
            f"teacher_sha256: the plan was made with teacher {plan.teacher_sha256[:12]} but the cached "
            f"teacher is {teacher_record.sha256[:12]} ({teacher_record.path})"
        )
    if teacher_model is None:
        teacher_model = load_teacher(plan.problem, teacher_record, info, dev)
    teacher_model = prec.prepare_model(freeze(teacher_model))
    torch.manual_seed(plan.seed)
    student: nn.Module = create_model(plan.problem.student.arch, info.num_classes, info.in_channels, info.image_size)
    student = prec.prepare_model(student.to(dev))
    in_shape = (info.in_channels, info.image_size, info.image_size)
    cache_inputs = data.train.images if (cache_frozen_outputs and not plan.recipe.augment.enabled) else None
    runtime = Runtime.current(dev, prec)
    bs = plan.recipe.eval_batch_size
    if frozen_memo is not None and cache_inputs is not None:
        key = frozen_outputs_key(teacher_sha256=teacher_record.sha256, need_features=True, batch_size=bs,
                                 runtime=runtime, data_identity=[plan.problem.dataset.hashed(),
                                                                 list(cache_inputs.shape), str(cache_inputs.dtype)])
        inputs, model = cache_inputs, teacher_model
        outputs = frozen_memo.get(key, dev, lambda: FrozenForward(model, prec, inputs, bs, need_features=True).cache)
        teacher_fw = FrozenForward(teacher_model, prec, None, bs, need_features=True, precomputed=outputs)
    else:
        teacher_fw = FrozenForward(teacher_model, prec, cache_inputs, bs, need_features=True)
    return _Run(plan, dev, prec, data, teacher_record, teacher_model, teacher_fw, student,
                probe_shapes(student, in_shape), probe_shapes(teacher_model, in_shape), cache_inputs,
                prec.grad_scaler(), runtime)


def _resume(run: _Run, out: Path) -> None:
    """Continue after this plan's last stage checkpoint in ``out`` (each stage reseeds itself)."""
    ckpt = latest_checkpoint(out, run.plan.content_hash())
    if ckpt is None:
        return
    run.student.load_state_dict(ckpt["student"])
    run.results = [_stage_result_from_dict(d) for d in ckpt["results"]]
    run.start_stage = ckpt["stage_index"] + 1
    run.resumed_from = ckpt["stage_index"]
    run.opt_state = ckpt.get("optimizer")
    made_on = ckpt.get("made_on")
    here = _made_on(run)
    if made_on is not None and (made_on["device"], made_on["precision"]) != (here["device"], here["precision"]):
        run.notes.append(f"resumed after stage {ckpt['stage_index'] + 1} from a checkpoint made on {made_on['device']} "
                         f"({made_on['precision']}), going on on {here['device']} ({here['precision']}): "
                         "the later stages' numbers differ from a run on one machine")


def _build_stage(run: _Run, k: int) -> _Stage:
    """Stage k's method (modules built from the probed shapes), reference and seeded batches."""
    plan, info = run.plan, run.data.info
    spec = plan.stages[k]
    seed = _stage_seed(plan.seed, k)
    torch.manual_seed(seed)
    ctx = MethodContext(run.s_shapes, run.t_shapes, run.teacher_model, info.num_classes, info.num_train,
                        run.data.train.labels)
    method = build_method(spec.method, spec.params, ctx).to(run.dev)
    reference = None
    if k > 0:
        ref_model = run.prec.prepare_model(frozen_copy(run.student))
        ref_fw = FrozenForward(ref_model, run.prec, run.cache_inputs if plan.reference.lambda_ref > 0 else None,
                               plan.recipe.eval_batch_size, need_features=plan.reference.loss == "feature_mse")
        reference = ReferenceTerm(ref_fw, plan.reference)
    loader = TensorLoader(run.data.train, plan.recipe.batch_size, shuffle=True, augment=plan.recipe.augment,
                          generator=make_generator(run.dev, seed))
    return _Stage(k, spec, seed, method, reference, loader)


def _stage_optimizer(run: _Run, stage: _Stage) -> None:
    """A fresh optimizer and lr schedule for the stage, or the run's one carried on."""
    plan = run.plan
    student_params = trainable(run.student.parameters())
    method_params = trainable(stage.method.parameters())
    if plan.restart_optimizer or run.optimizer is None:
        run.optimizer = build_optimizer([{"params": student_params}], plan.recipe, run.dev)
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


def _train_stage(run: _Run, stage: _Stage, on_epoch_end: EpochCallback | None, *, start: StageResult | None = None,
                 save_after: Collection[int] = (),
                 put_partial: Callable[[_Stage, StageResult], None] | None = None,
                 ) -> StageResult:
    """The stage's epochs (those after ``start``'s, when it goes on from a partial entry), each followed
    by a validation pass, and by ``put_partial`` after the epoch counts in ``save_after``; stops at a
    non-finite loss."""
    assert run.optimizer is not None and stage.schedule is not None
    result = start if start is not None else StageResult(
        stage.index, stage.spec.method, stage.spec.epochs, run.cum_epochs, 0.0, 0.0, run.data.info.num_val,
        stage.reference is not None and stage.reference.active)
    cum_epochs = run.cum_epochs + len(result.epoch_metrics)
    for e in range(len(result.epoch_metrics), stage.spec.epochs):
        teacher, store_key = _epoch_teacher(run, stage, e)
        stats = train_epoch(student=run.student, method=stage.method, teacher=teacher,
                            reference=stage.reference, loader=stage.loader, optimizer=run.optimizer,
                            schedule=stage.schedule, stage_epoch=e, precision=run.prec, scaler=run.scaler)
        if isinstance(teacher, EpochTeacher):
            _finish_epoch_teacher(run, teacher, store_key)
        if not math.isfinite(stats.loss):
            raise Diverged(f"diverged: non-finite loss at stage {stage.index + 1}, epoch {e + 1}")
        cum_epochs += 1
        val = evaluate(run.student, run.data.val, run.prec, run.plan.recipe.eval_batch_size)
        em = EpochMetrics(e + 1, cum_epochs, stats.loss, stats.ce, stats.kd, stats.ref, stats.acc,
                          stats.lr, val.acc, val.loss)
        result.epoch_metrics.append(em)
        if put_partial is not None and e + 1 in save_after:
            put_partial(stage, result)  # before the callback: a search may stop the run inside it
        if on_epoch_end is not None:
            on_epoch_end(stage.index, em)
    last = result.epoch_metrics[-1]
    result.cum_epochs, result.val_acc, result.val_loss = cum_epochs, last.val_acc, last.val_loss
    return result


def _epoch_teacher(run: _Run, stage: _Stage, epoch: int) -> tuple[TeacherForward, str]:
    """The teacher's forward for this epoch: through the logit store where the run has one."""
    if run.logit_store is None:
        return run.teacher_fw, ""
    key = teacher_logits_key(run.plan, stage.index, epoch, loader_seed=stage.seed,
                             train_shape=tuple(run.data.train.images.shape), teacher_sha256=run.teacher_record.sha256,
                             runtime=run.runtime, stored=run.logit_store.tag)
    store, need_features = run.logit_store, stage.method.teacher_features
    if need_features:
        # The forward runs anyway: its logits are put only where the store lacks them (not loaded).
        return EpochTeacher(run.teacher_fw, None, need_features=True, device=run.dev, record=not store.has(key),
                            round_to=store.dtype), key
    return EpochTeacher(run.teacher_fw, store.get(key), need_features=False, device=run.dev, round_to=store.dtype), key


def _finish_epoch_teacher(run: _Run, teacher: EpochTeacher, key: str) -> None:
    """Check a served epoch against its batches, or put the logits the epoch computed."""
    assert run.logit_store is not None
    try:
        recorded = teacher.finish()
    except StoreMismatch:
        run.logit_store.discard(key)  # never served again
        raise
    if teacher.serving:
        run.teacher_epochs_served += 1
        run.logit_store.served += 1
    elif recorded is not None:
        run.logit_store.put(key, recorded)


def _stage_payload(run: _Run, k: int) -> dict:
    """What a checkpoint of stage k holds: the student, the carried optimizer state, the results so far."""
    return {
        "version": CHECKPOINT_VERSION,
        "plan_hash": run.plan.content_hash(),
        "stage_index": k,
        "student": {n: t.detach().cpu() for n, t in run.student.state_dict().items()},
        "optimizer": None if run.plan.restart_optimizer or run.optimizer is None
        else _on_cpu(_student_only_state(run.optimizer)),
        "made_on": _made_on(run),
        # Plain data only (loaded back with weights_only=True): dataclasses as dicts of numbers.
        # (Whether a stage came from the stage cache belongs to the run, not to the stage.)
        "results": [{**asdict(r), "reused": False} for r in run.results[: k + 1]],
    }


def _save_stage(run: _Run, k: int, out: Path) -> Path:
    """Stage k's checkpoint (:func:`_stage_payload`) in ``out``."""
    path = checkpoint_path(out, k)
    _save_checkpoint(path, _stage_payload(run, k))
    return path


def _made_on(run: _Run) -> dict[str, str]:
    """Where a checkpoint's numbers were made: the device (a GPU by its name), precision, GPU numerics."""
    return {"device": device_name(run.dev), "precision": run.prec.name, "numerics": run.runtime.numerics}


def _on_cpu(state: Any) -> Any:
    """An optimizer state dict with its tensors on the CPU (a checkpoint must load where there is no GPU)."""
    if isinstance(state, torch.Tensor):
        return state.detach().cpu()
    if isinstance(state, dict):
        return {k: _on_cpu(v) for k, v in state.items()}
    if isinstance(state, list):
        return [_on_cpu(v) for v in state]
    return state


def _student_only_state(optimizer: torch.optim.Optimizer) -> dict:
    state = optimizer.state_dict()
    keep = set(state["param_groups"][0]["params"])
    return {"state": {k: v for k, v in state["state"].items() if k in keep}, "param_groups": state["param_groups"][:1]}


def _stage_result_from_dict(d: dict) -> StageResult:
    d = dict(d)
    d["epoch_metrics"] = [EpochMetrics(**m) for m in d.get("epoch_metrics", [])]
    return StageResult(**d)


def evaluate_test(plan: Plan, result: RunResult, device: torch.device | str | None = None,
                  precision: str = "auto") -> EvalResult:
    """Test accuracy of a finished run's student: the explicit evaluation call, never made in a search."""
    if result.student is None:
        raise ValueError("the run did not keep its student (keep_student=False)")
    dev = next(result.student.parameters()).device if device is None else pick_device(str(device))
    test = load_test_split(plan.problem.dataset, result.data_info, dev)
    return evaluate(result.student, test, pick_precision(dev, precision), plan.recipe.eval_batch_size)


def write_results(path: Path, plan: Plan, result: RunResult, test: EvalResult | None) -> None:
    payload = result.to_dict()
    payload["plan_name"] = plan.name
    payload["sequence"] = plan.sequence()
    payload["total_epochs"] = plan.total_epochs
    payload["final_val_acc"] = result.final_val_acc
    payload["n_val"] = result.stages[-1].n_val
    if test is not None:
        payload["test_acc"], payload["n_test"] = test.acc, test.n
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2))
