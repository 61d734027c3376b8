"""The Ray Tune function trainable: one trial = one SMSKD plan run by the engine.

The trial's config (made by the define-by-run function on the driver) carries the plan as YAML,
its run folder and its torch thread count. At each stage end the trial reports validation accuracy
with cumulative epochs (the scheduler's time axis) and the stage checkpoint; when the scheduler
stops it, Tune ends the trial inside that report. Where the space prunes at the rungs
(``pruning.decide_at: rungs``), the trial also reports, without a checkpoint, after exactly each
rung's number of cumulative epochs when that falls inside a stage.

Stage checkpoints live in the trial's run folder (``<storage>/<study>/trials/<number>``; a trial
on a URI storage trains in a scratch folder and uploads each, see :mod:`~smskd_search.search.run_dirs`),
which is what makes a killed search resumable: a resumed study runs an interrupted trial's plan again
from its last finished stage. Tune's own checkpoint of the trial (``tune.get_checkpoint()``) is
used the same way when Tune restarts a trial whose worker died.

Finished stages also go into the study storage's stage-prefix cache (``<studies_dir>/cache/stages``,
see :mod:`smskd_search.engine.prefix_cache`): a trial whose plan starts with stages another trial
already trained starts from there. It reports those stages as if it had trained them (every rung
inside them included, so the scheduler judges it at the same points), marked ``reused``, and
counts ``epochs_reused`` and ``epochs_trained`` in every report. A stage still under way at a rung is
put there too, so that a trial pruned inside a stage leaves it reusable: a later trial whose plan
has that stage goes on from the rung. Two trials wanting one prefix at
once both train it (the cache's put is atomic: the second write replaces the first with the same
numbers). The frozen teacher's outputs over the training split are computed once per worker
process, and once per study where ``cache/teacher_outputs`` has them already. With augmented
batches, the teacher's logits of each (seed, stage, epoch) batch stream go into
``cache/teacher_logits`` (:mod:`smskd_search.engine.logit_store`): a later trial's KD, DKD or CE
epoch on that stream reads them instead of running the teacher, with the same numbers; trials that
reach an epoch together run the teacher over it once between them, each over a part
(:mod:`smskd_search.engine.logit_claims`), and report the epochs they read (``teacher_epochs_served``)
and the seconds they waited for the others' parts (``teacher_wait_s``).

A plan that raises is reported as one result carrying ``error`` (and not raised to Tune): the
searcher stores the message as the trial's ``fail_reason``, and Tune does not retry a plan that
would fail again. A device fault (out of GPU memory, a CUDA, cuBLAS or cuDNN error) is the machine's:
after reporting it the trial raises :class:`DeviceFault`, so that Tune retires the worker (a CUDA
context that hit an illegal address is unusable for good) and tries the trial once more in a fresh
one; if that fails too, the searcher records an infrastructure failure, retried off the budget.

On a GPU shared by several trials (``gpus_per_trial`` below 1), each worker caps its GPU memory at its
share (:func:`~smskd_search.engine.device.limit_memory`): a trial that outgrows it fails with out of
memory instead of taking its neighbours'.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import yaml

from smskd_search.engine.device import is_device_fault
from smskd_search.errors import UserError
from smskd_search.search import run_dirs
from smskd_search.search import storage_fs as sfs
from smskd_search.search._ray import ray, tune
from smskd_search.search.teacher_transport import TeacherPayload, unpack
from smskd_search.search.trial_report import TrialReport

if TYPE_CHECKING:
    from smskd_search.engine import EpochMetrics, LogitStore, StageEvent, StageResult, Workbench
    from smskd_search.plan import Plan

# Per worker process: with reuse_actors the data and the teacher stay loaded across trials.
_DATA_CACHE: dict[str, Any] = {}
_TEACHER_CACHE: dict[str, Any] = {}
_FROZEN_MEMO: dict[str, Any] = {}  # the teacher-output memo, by its folder
_LOGIT_STORE: dict[str, Any] = {}  # the teacher-logit store (its in-process tier), by its folder


@dataclass(frozen=True)
class TrialContext:
    """What every trial of a search shares (shipped once through Ray's object store).

    Args:
        teacher: The teacher's record and weights (a trial never reads the driver's teacher path).
        device: ``"cuda"`` or ``"cpu"``.
        keep_run_dirs: Keep the trial's stage checkpoints after it finished (tests).
        cache_dir: The study storage's cache folder (``stages/``, ``teacher_outputs/``,
            ``teacher_logits/``); None: no stage cache and no teacher-logit store, and the
            teacher's outputs are kept in this process only.
        cache_max_bytes: The cap of each of the three caches (least recently used entries go first).
        deterministic: On a GPU, PyTorch's deterministic algorithms.
        gpu_share: The GPUs each trial asked Ray for (a fraction when trials share a GPU): its cap
            on the GPU's memory.
        cuda_graphs: On a GPU, record each stage's training step as a CUDA graph (``RunOptions``).
    """

    teacher: TeacherPayload
    device: str = "cpu"
    keep_run_dirs: bool = False
    cache_dir: str | None = None
    cache_max_bytes: int = 2 * 2**30
    deterministic: bool = False
    gpu_share: float = 0.0
    cuda_graphs: bool = False


class DeviceFault(RuntimeError):
    """Raised to Tune after a device fault was reported, so that the worker that hit it is retired."""


def _dataset_on_this_node(plan: Any, data_root: str | None) -> Any:
    """The plan's dataset, read from ``data_root`` (the driver's absolute form of its root) if given."""
    dataset = plan.problem.dataset
    if data_root:
        dataset = dataset.model_copy(update={"root": data_root})
        if not os.path.isdir(data_root) and not dataset.download:  # with download, the load fetches it here
            raise UserError(f"dataset.root: {data_root} not found on node {socket.gethostname()} "
                            f"(the space says {plan.problem.dataset.root!r})")
    return dataset


def _shared_inputs(plan: Any, context: TrialContext, data_root: str | None = None) -> tuple[Any, Any, Any]:
    from smskd_search.data import load_data
    from smskd_search.engine import load_teacher
    from smskd_search.engine.device import limit_memory, pick_device

    dev = pick_device(context.device)
    if context.gpu_share:
        limit_memory(dev, context.gpu_share)
    dataset = _dataset_on_this_node(plan, data_root)
    data_key = json.dumps([dataset.model_dump(mode="json"), context.device], sort_keys=True)
    data = _DATA_CACHE.get(data_key)
    if data is None:
        _DATA_CACHE.clear()  # one problem per search: keep memory bounded when a worker is reused
        try:
            data = load_data(dataset, dev)
        except UserError as exc:
            raise UserError(f"node {socket.gethostname()}: {exc}") from None
        _DATA_CACHE[data_key] = data
    record, weights = unpack(context.teacher)  # checked on every trial: a cache hit must not skip it
    teacher_key = json.dumps([record.sha256, plan.problem.teacher.arch, data_key], sort_keys=True)
    teacher = _TEACHER_CACHE.get(teacher_key)
    if teacher is None:
        _TEACHER_CACHE.clear()
        teacher = _TEACHER_CACHE[teacher_key] = load_teacher(plan.problem, record, data.info, dev, weights=weights)
    return data, teacher, record


def _cache_folder(root: str, name: str) -> Any:
    """A cache's folder under ``root``: a local folder, or one in the storage a URI names."""
    return sfs.ArrowFolder(sfs.join(root, name)) if sfs.is_uri(root) else Path(root) / name


def _caches(context: TrialContext) -> tuple[Any, Any, Any]:
    """The stage cache (or None), this process's teacher-output memo, the teacher-logit store (or None)."""
    from smskd_search.engine import FrozenOutputsMemo, LogitStore, PrefixCache

    root = context.cache_dir
    stages = PrefixCache(_cache_folder(root, "stages"), context.cache_max_bytes) if root else None
    key = str(root)
    memo = _FROZEN_MEMO.get(key)
    if memo is None:
        _FROZEN_MEMO.clear()  # one memo (one teacher's outputs) per worker process
        store = PrefixCache(_cache_folder(root, "teacher_outputs"), context.cache_max_bytes) if root else None
        memo = _FROZEN_MEMO[key] = FrozenOutputsMemo(store)
    logits = None
    if root:
        # Kept per process so that its in-memory tier serves the next trial of a reused worker too.
        logits = _LOGIT_STORE.get(key)
        if logits is None:
            _LOGIT_STORE.clear()
            logits = _LOGIT_STORE[key] = LogitStore(_cache_folder(root, "teacher_logits"), context.cache_max_bytes)
    return stages, memo, logits


def _workbench(plan: Any, context: TrialContext, data_root: str | None) -> Workbench:
    """This worker's workbench for the trial: its data, teacher and caches are loaded once per
    worker process and kept across the trials it runs (``reuse_actors``)."""
    from smskd_search.engine import Workbench

    data, teacher, record = _shared_inputs(plan, context, data_root)
    stage_cache, memo, logit_store = _caches(context)
    return Workbench.open(plan.problem, device=context.device, data=data, teacher_record=record, teacher=teacher,
                          stage_cache=stage_cache, frozen_memo=memo, logit_store=logit_store,
                          deterministic=context.deterministic)


def _link_or_copy(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


_INFRA_RUNTIME_ERRORS = ("inline_container.cc", "PytorchStreamWriter", "file write failed")


def is_infrastructure_error(exc: BaseException) -> bool:
    """A failure of the machine rather than of the plan: storage (OSError), memory (host or GPU), a
    CUDA, cuBLAS or cuDNN error (:func:`~smskd_search.engine.device.is_device_fault`).

    A user error (a missing dataset, a bad checkpoint) is the plan's, even where an OSError caused it.

    Example:

        >>> is_infrastructure_error(OSError(28, "No space left on device")), is_infrastructure_error(ValueError("x"))
        (True, False)
    """
    if isinstance(exc, UserError):
        return False
    if isinstance(exc, (OSError, MemoryError)) or is_device_fault(exc):
        return True
    # torch.save on a full disk raises a RuntimeError from its zip writer, not an OSError.
    return isinstance(exc, RuntimeError) and any(s in str(exc) for s in _INFRA_RUNTIME_ERRORS)


def _report_infrastructure_failure(exc: OSError, total_epochs: int) -> None:
    message = f"infrastructure: {type(exc).__name__}: {exc}".strip().splitlines()[0][:500]
    tune.report(TrialReport.failure(message, total_epochs=total_epochs, traceback=traceback.format_exc()[-4000:],
                                    infrastructure=True).to_dict())


def train_trial(config: dict[str, Any], context: TrialContext) -> None:
    """Run the trial's plan; see the module docstring."""
    started, started_at = time.perf_counter(), time.time()
    # The run folder where the stage checkpoints are kept (a folder or a URI in the storage), and
    # the folder this trial trains in (the same folder, or a scratch folder on this node).
    from smskd_search.plan import parse_plan

    plan = parse_plan(yaml.safe_load(config["plan_yaml"]), source="trial plan")
    kept = str(config["run_dir"])
    try:
        run_dir = run_dirs.work_dir(kept)
    except OSError as exc:
        # Reported, not raised: a raise makes Tune restart the actor and try once more before the
        # searcher's own retry (one more worker start, about 5 s, for nothing).
        _report_infrastructure_failure(exc, plan.total_epochs)
        return
    try:
        _train(config, context, plan, kept, run_dir, started, started_at)
    finally:
        # A URI's scratch folder goes however the trial ends (Tune stops a pruned one inside a report).
        run_dirs.finish(run_dir, kept)


def _train(config: dict[str, Any], context: TrialContext, plan: Plan, kept: str, run_dir: Path, started: float,
           started_at: float) -> None:
    from smskd_search.engine import Diverged, RunOptions, discard_unsafe_checkpoints, run_plan

    # Results depend on torch's thread count on the CPU; the trial records the number it used.
    torch.set_num_threads(max(1, int(config["threads"])))
    resume_dirs = [str(d) for d in config.get("resume_dirs") or []]
    try:
        restored = tune.get_checkpoint()
        if restored is not None:
            with restored.as_directory() as d:
                run_dirs.adopt(d, run_dir)
        # Its own run folder first (Tune restarted it, or an upload got ahead of Tune's checkpoint),
        # then the earlier attempts', nearest first; stage files of one plan are the same in all of them.
        for d in [kept, *resume_dirs]:
            run_dirs.adopt(d, run_dir)
        # A stage checkpoint that would need to run code to load (an older format) is trained again.
        discard_unsafe_checkpoints(run_dir)
    except OSError as exc:  # a download from the storage failed: retried as the machinery's failure
        _report_infrastructure_failure(exc, plan.total_epochs)
        return

    rung_epochs = frozenset(config.get("rung_epochs") or [])
    infra = fault = False
    try:
        bench = _workbench(plan, context, config.get("data_root"))
        reporter = _Reporter(plan, config, kept, run_dir, started, started_at, rung_epochs, bench.data.info.num_val,
                             bench.data.info.num_train, bench.logit_store)
        options = RunOptions(out_dir=run_dir, resume=True, keep_student=False, partial_at=rung_epochs,
                             cuda_graphs=context.cuda_graphs)
        result = run_plan(plan, bench, options, reporter)
        for note in result.notes:
            print(f"trial {plan.name}: {note}", file=sys.stderr)  # into the worker's log
    except Exception as exc:  # noqa: BLE001 - reported as the trial's failure (SystemExit is Tune's stop)
        # A divergence is said as it is ("diverged: non-finite loss at stage k, epoch e").
        message = str(exc) if isinstance(exc, Diverged) else f"{type(exc).__name__}: {exc}".strip()
        infra = is_infrastructure_error(exc)
        fault = is_device_fault(exc)
        if infra:
            message = f"infrastructure: {message}"
        tune.report(TrialReport.failure(message.splitlines()[0][:500] if message else type(exc).__name__,
                                        total_epochs=plan.total_epochs, traceback=traceback.format_exc()[-4000:],
                                        infrastructure=infra).to_dict())
        if fault:
            raise DeviceFault(message.splitlines()[0][:500]) from None
    if not context.keep_run_dirs and not infra:
        # Finished (completed, or failed through its plan): the checkpoints were only there for a
        # resume. An infrastructure failure keeps them: its retry starts from the last stage.
        for d in [kept, *resume_dirs]:
            run_dirs.drop(d)


class _Reporter:
    """Hears the run's stage events and reports them to Tune: every stage end (with its checkpoint,
    pushed to the run folder first), and every rung a stage crosses where pruning is decided at the
    rungs. Stages from the trial's own checkpoints are reported as ``replayed``, those from the stage
    cache (whole or partial) as ``reused``, so that the scheduler judges every trial at the same points."""

    def __init__(self, plan: Plan, config: dict[str, Any], kept: str, run_dir: Path, started: float,
                 started_at: float, rung_epochs: frozenset[int], n_val: int, n_train: int = 0,
                 logit_store: LogitStore | None = None):
        self.plan, self.config, self.kept, self.run_dir = plan, config, kept, run_dir
        self.started, self.started_at = started, started_at
        self.node = ray.get_runtime_context().get_node_id() if ray.is_initialized() else None
        self.rung_epochs, self.n_val, self.n_train = rung_epochs, n_val, n_train
        # The worker's store serves one trial at a time: this trial's share is what it adds.
        self.store = logit_store
        self.store_before = (logit_store.served, logit_store.wait_s) if logit_store is not None else (0.0, 0.0)
        # Epochs replayed from this trial's own checkpoints, and trained here (the rest came from the cache).
        self.resumed = self.trained = 0

    def __call__(self, event: StageEvent) -> bool:
        from smskd_search.engine import EpochsReused, EpochTrained, StageResumed

        if isinstance(event, StageResumed):
            r = event.result
            self._rungs(r.index, r.epoch_metrics, r.n_val, replayed=True)
            self.resumed = r.cum_epochs
            tune.report(self._report(r, replayed=True).to_dict())
        elif isinstance(event, EpochTrained):
            self.trained += 1
            self._rungs(event.stage, [event.metrics], self.n_val, replayed=False)
        elif isinstance(event, EpochsReused):
            # The first epochs of a stage another trial was stopped in (at a rung): reported as trained ones.
            self._rungs(event.stage, event.metrics, self.n_val, replayed=False, reused=True)
        else:
            self._stage_end(event.result, event.checkpoint)
        return False

    def _report(self, r: StageResult, *, replayed: bool = False) -> TrialReport:
        return self._make(r.index, r.cum_epochs, r.val_acc, r.val_loss, r.n_val, replayed,
                          [em.val_acc for em in r.epoch_metrics], reused=r.reused)

    def _make(self, stage_index: int, cum_epochs: int, val_acc: float, val_loss: float, n_val: int, replayed: bool,
              epoch_val_acc: list[float], stage_end: bool = True, reused: bool = False) -> TrialReport:
        n_stages = len(self.plan.stages)
        return TrialReport(
            val_acc=val_acc, val_loss=val_loss, cum_epochs=cum_epochs, stage=stage_index + 1, n_stages=n_stages,
            final=stage_end and stage_index + 1 == n_stages, n_val=n_val, stage_end=stage_end,
            total_epochs=self.plan.total_epochs, method=self.plan.stages[stage_index].method, replayed=replayed,
            reused=reused, epochs_trained=self.trained, images_trained=self.trained * self.n_train,
            teacher_epochs_served=self.store.served - self.store_before[0] if self.store is not None else 0.0,
            teacher_wait_s=round(self.store.wait_s - self.store_before[1], 3) if self.store is not None else 0.0,
            epochs_reused=max(0, cum_epochs - self.resumed - self.trained),
            # Seconds inside the trainable so far: Ray's overhead is the search's wall time less this.
            trial_seconds=time.perf_counter() - self.started, trial_started_at=self.started_at, node=self.node,
            baseline=bool(self.config.get("baseline")),
            confirmation=bool(self.config.get("confirmation")),
            # The learning curve up to here (the engine evaluates every epoch); the study keeps it.
            epoch_val_acc=[float(v) for v in epoch_val_acc],
        )

    def _rungs(self, stage_index: int, metrics: list[EpochMetrics], n_val: int, *, replayed: bool,
               reused: bool = False) -> None:
        """A mid-stage report where the stage crosses a rung (not at its end, which reports as such)."""
        for em in metrics:
            if em.cum_epochs in self.rung_epochs and em.epoch != self.plan.stages[stage_index].epochs:
                tune.report(self._make(stage_index, em.cum_epochs, em.val_acc, em.val_loss, n_val, replayed,
                                       [em.val_acc], stage_end=False, reused=reused).to_dict())

    def _stage_end(self, result: StageResult, checkpoint: Path | None) -> None:
        if result.reused:
            # A stage from the stage cache: its rungs are reported as a trained stage's would be.
            self._rungs(result.index, result.epoch_metrics, result.n_val, replayed=False, reused=True)
        m = self._report(result).to_dict()
        if checkpoint is None:
            tune.report(m)
            return
        run_dirs.push(checkpoint, self.kept)  # in the storage before Tune hears of the stage
        staging = self.run_dir / f"tune-stage{result.index + 1}"
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir()
        _link_or_copy(checkpoint, staging / checkpoint.name)
        try:
            # Tune copies the folder into its storage before report() returns (or stops the trial).
            tune.report(m, checkpoint=tune.Checkpoint.from_directory(str(staging)))
        finally:
            shutil.rmtree(staging, ignore_errors=True)


__all__ = ["DeviceFault", "TrialContext", "is_infrastructure_error", "train_trial"]
