"""``run_plan``: one SMSKD pipeline, stage by stage.

Stage 1 trains with CE + its method's loss. At each stage end the student is evaluated on the
validation split, checkpointed, and copied into a frozen reference (eval mode, no gradients); the
method's extra modules are dropped; the next stage builds its own from probed shapes, with a fresh
optimizer and a restarted lr schedule unless the plan says otherwise. From stage 2 on, the loss adds
``lambda_ref * mean_i(w_i * tau^2 * KL(ref || student))`` with TCP weights ``w_i``.

A run looks its stages up in a :class:`~smskd_search.engine.stage_store.StageStore`: it goes on after
its own last checkpoint (``resume``), then from the longest prefix of its stages in the stage-prefix
cache (:mod:`~smskd_search.engine.prefix_cache`), and puts every stage it trains there; the numbers
are those of a run from scratch (each stage reseeds itself from the plan's seed and its index).
Asked to (``partial_at``, the search's rungs), it also puts a stage's state part-way through
(student, the method's modules, optimizer, random streams), and goes on from such an entry when a
stage it must train has one. Given a teacher-logit store (:mod:`~smskd_search.engine.logit_store`),
an epoch on augmented batches whose method reads only the teacher's logits takes them from the
store when another run put them, with the same numbers, and every epoch that ran the teacher
forward puts its logits there. What happens is told as a stream of events
(:mod:`~smskd_search.engine.events`).

Batches come from the workbench's splits (:mod:`smskd_search.data.batches`), held as tensors or
streamed from an image folder: the same plan and seed see the same batches either way. A streamed
split has no device-resident images to precompute the frozen outputs over, and its runs do not use
the teacher-logit store: the result's notes say so.

Neither Ray nor Optuna is imported here: a plan runs wherever torch runs.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from smskd_search.data import load_test_split
from smskd_search.data.folder_split import data_identity
from smskd_search.engine.checkpoints import resume_note
from smskd_search.engine.device import pick_device, pick_precision, set_numerics
from smskd_search.engine.evaluate import EvalResult, evaluate
from smskd_search.engine.events import (
    EventSink,
    StageEvent,
    StageResumed,
    StageReused,
    StageTrained,
    from_callbacks,
)
from smskd_search.engine.frozen import FrozenForward, frozen_outputs_key
from smskd_search.engine.prefix_cache import Runtime
from smskd_search.engine.results import RunResult, stage_result_from_dict
from smskd_search.engine.stage import RunState, build_stage, go_on_from_partial, train_stage
from smskd_search.engine.stage_store import Slot, StageStore
from smskd_search.engine.workbench import Workbench
from smskd_search.models import create_model, probe_shapes
from smskd_search.plan import Plan
from smskd_search.validate import check_plan


@dataclass(frozen=True)
class RunOptions:
    """How one run goes, beyond its plan and its workbench.

    Args:
        out_dir: Where stage checkpoints go (``stage{k}.pt``); None: no checkpoints.
        resume: Continue from the last checkpoint of this plan in ``out_dir``.
        keep_student: Keep the trained student in the result (for :func:`evaluate_test`).
        cache_frozen_outputs: Precompute the teacher's and the reference's outputs when training
            batches are not augmented (the same results, cheaper steps).
        partial_at: Cumulative epochs (the search's rungs) at which a stage still under way is put
            in the workbench's stage cache, so that a run stopped there leaves its stage reusable.
        cuda_graphs: On a GPU, record each stage's training step as a CUDA graph and replay it
            (:mod:`~smskd_search.engine.step_graph`); a stage it cannot take runs eagerly and the
            result's notes say why. Cache keys tell graphed runs apart. No effect on a CPU.
    """

    out_dir: Path | None = None
    resume: bool = False
    keep_student: bool = True
    cache_frozen_outputs: bool = True
    partial_at: frozenset[int] = frozenset()
    cuda_graphs: bool = False


def run_plan(plan: Plan, bench: Workbench | None = None, options: RunOptions | None = None,
             on_event: EventSink | None = None, **legacy: Any) -> RunResult:
    """Run a plan stage by stage; see the module docstring for the exact semantics.

    Args:
        plan: The plan (checked for known models, methods and parameters first).
        bench: The worker's device, data, teacher and caches (default: :meth:`Workbench.open` for
            the plan's problem, with the teacher cache in ``studies/teachers``).
        options: Checkpoints, resume, what to keep (:class:`RunOptions`).
        on_event: Hears every :mod:`~smskd_search.engine.events` event; True after a stage's end
            stops the run there.
        **legacy: The keywords of the earlier interface (``device``, ``precision``,
            ``teacher_cache``, ``data``, ``teacher_model``, ``teacher_record``, ``stage_cache``,
            ``frozen_memo``, ``logit_store``, ``deterministic``, ``out_dir``, ``resume``,
            ``keep_student``, ``cache_frozen_outputs``, ``partial_at``, ``on_stage_end``,
            ``on_epoch_end``, ``on_epochs_reused``), for a caller without a workbench.

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
    if legacy:
        bench, options, on_event = _legacy_arguments(plan, bench, options, on_event, legacy)
    bench = bench if bench is not None else Workbench.open(plan.problem)
    options = options if options is not None else RunOptions()
    run = _start(plan, bench, on_event if on_event is not None else _ignore, options)
    store = StageStore.for_run(plan, runtime=run.runtime, precision=bench.precision,
                               teacher_sha256=bench.teacher_record.sha256,
                               logits_tag=run.logit_store.tag if run.logit_store is not None else "exact",
                               cache=bench.stage_cache, out_dir=options.out_dir, partial_at=options.partial_at)
    if options.resume:
        _resume(run, store)
    epochs_resumed, start = run.cum_epochs, len(run.results)
    reused_until = _reuse_prefix(run, store)
    stopped, trained, partly_reused = False, 0, 0
    for k in range(start, len(plan.stages)):
        event: StageEvent
        if k < reused_until:
            ckpt = store.put(Slot(k, own=True), run.checkpoint(k)) if k + 1 == reused_until else None
            event = StageReused(k, run.results[k], ckpt)
        else:
            stage = build_stage(run, k)  # its method, its reference (the student so far, frozen), its batches
            partials = store.partials(k, run.cum_epochs)
            so_far = go_on_from_partial(run, stage, store, partials)
            done = len(so_far.epoch_metrics) if so_far is not None else 0
            result = train_stage(run, stage, store, partials, so_far)  # each epoch, then a validation pass
            del stage, so_far  # the stage's extra modules and reference go with it
            partly_reused, trained = partly_reused + done, trained + result.epochs - done
            run.results.append(result)
            payload = run.checkpoint(k)
            ckpt = store.put(Slot(k, own=True), payload)
            store.finish(k, payload, partials)  # in the stage cache, in place of its partial entries
            event = StageTrained(k, result, ckpt)
        if run.emit(event) and k + 1 < len(plan.stages):
            stopped = True
            break
    reused = sum(r.epochs for r in run.results if r.reused) + partly_reused
    return RunResult(plan.content_hash(), run.results, stopped, run.resumed_from, bench.teacher_record,
                     bench.data.info, run.student if options.keep_student else None, epochs_reused=reused,
                     epochs_trained=trained, epochs_resumed=epochs_resumed, cache_skipped=store.skipped,
                     teacher_epochs_served=run.teacher_epochs_served, notes=run.notes)


def _ignore(event: StageEvent) -> None:
    return None


def _start(plan: Plan, bench: Workbench, emit: EventSink, options: RunOptions) -> RunState:
    """The run's numerics, a fresh student (seeded by the plan), the teacher's forward, the shapes
    methods probe."""
    dev, prec, info = bench.device, bench.precision, bench.data.info
    set_numerics(dev, prec, bench.deterministic)
    bench.check_teacher(plan)
    torch.manual_seed(plan.seed)
    student: nn.Module = create_model(plan.problem.student.arch, info.num_classes, info.in_channels, info.image_size)
    student = prec.prepare_model(student.to(dev))
    in_shape = (info.in_channels, info.image_size, info.image_size)
    cache_frozen_outputs = options.cache_frozen_outputs
    notes = _streaming_notes(plan, bench, cache_frozen_outputs)
    # Precomputed frozen outputs need the whole split on the device: a streamed one has no such tensor.
    resident = bench.data.train.resident_images
    cache_inputs = resident if (cache_frozen_outputs and not plan.recipe.augment.enabled) else None
    graphs = options.cuda_graphs and dev.type == "cuda"
    if options.cuda_graphs and not graphs:
        notes.append("cuda_graphs: no CUDA device, every step runs eagerly")
    runtime = Runtime.current(dev, prec, cuda_graphs=graphs)
    teacher_fw = _teacher_forward(plan, bench, cache_inputs, runtime)
    store = bench.logit_store if not (teacher_fw.cached or bench.data.train.streamed) else None
    return RunState(plan, bench, emit, student, probe_shapes(student, in_shape), probe_shapes(bench.teacher, in_shape),
                    teacher_fw, cache_inputs, prec.grad_scaler(), runtime, logit_store=store, notes=notes,
                    cuda_graphs=graphs)


def _streaming_notes(plan: Plan, bench: Workbench, cache_frozen_outputs: bool) -> list[str]:
    """What a run on streamed data does without (said in its :class:`RunResult`'s notes).

    The frozen-outputs memo keys the teacher's outputs by positions in a device-resident tensor,
    which a streamed split does not have; the teacher-logit store would hold an epoch of logits per
    stage epoch (gigabytes at ImageNet's size), and its key's ``train_shape`` does not tell a
    streamed folder from the same folder held in memory. Both are off for streamed data.
    """
    if not bench.data.train.streamed:
        return []
    notes = []
    if cache_frozen_outputs and not plan.recipe.augment.enabled:
        notes.append("streamed data: the frozen teacher's and reference's outputs are computed per batch "
                     "(no precomputed outputs without device-resident images)")
    if bench.logit_store is not None:
        notes.append("streamed data: the teacher-logit store is not used (the teacher runs on every batch)")
    return notes


def _teacher_forward(plan: Plan, bench: Workbench, inputs: torch.Tensor | None, runtime: Runtime) -> FrozenForward:
    """The frozen teacher, its outputs over the training split precomputed (once per workbench where
    it keeps them) when batches are not augmented."""
    bs, model, prec = plan.recipe.eval_batch_size, bench.teacher, bench.precision
    if bench.frozen_memo is None or inputs is None:
        return FrozenForward(model, prec, inputs, bs, need_features=True)
    key = frozen_outputs_key(teacher_sha256=bench.teacher_record.sha256, need_features=True, batch_size=bs,
                             runtime=runtime, data_identity=[data_identity(plan.problem.dataset), list(inputs.shape),
                                                             str(inputs.dtype)])
    outputs = bench.frozen_memo.get(key, bench.device,
                                    lambda: FrozenForward(model, prec, inputs, bs, need_features=True).cache)
    return FrozenForward(model, prec, None, bs, need_features=True, precomputed=outputs)


def _resume(run: RunState, store: StageStore) -> None:
    """Continue after this plan's last stage checkpoint (each stage reseeds itself); emits a
    :class:`StageResumed` per stage it holds."""
    ckpt = store.resume_point()
    if ckpt is None:
        return
    run.student.load_state_dict(ckpt["student"])
    run.results = [stage_result_from_dict(d) for d in ckpt["results"]]
    run.resumed_from = ckpt["stage_index"]
    run.opt_state = ckpt.get("optimizer")
    note = resume_note(ckpt, run.made_on())
    if note is not None:
        run.notes.append(note)
    for r in run.results:
        run.emit(StageResumed(r.index, r))


def _reuse_prefix(run: RunState, store: StageStore) -> int:
    """Load the longest cached prefix that goes further than the run's own checkpoint; returns the
    number of stages the run then has."""
    start = len(run.results)
    for slot in store.prefixes(after=start):
        entry = store.get(slot)
        if entry is None:
            continue
        try:
            results = [stage_result_from_dict(d) for d in entry["results"]]
            run.student.load_state_dict(entry["student"])
        except (KeyError, TypeError, RuntimeError):
            continue  # not an entry this engine wrote: train instead
        for r in results[start:]:
            r.reused = True
        run.results = run.results[:start] + results[start:]
        return slot.stage + 1
    return start


def _legacy_arguments(plan: Plan, bench: Workbench | None, options: RunOptions | None, on_event: EventSink | None,
                      kw: dict[str, Any]) -> tuple[Workbench, RunOptions, EventSink | None]:
    """The workbench, options and event sink the earlier interface's keywords say."""
    bench_names = {"device", "precision", "teacher_cache", "data", "teacher_record", "stage_cache", "frozen_memo",
                   "logit_store", "deterministic"}
    option_names = {"out_dir", "resume", "keep_student", "cache_frozen_outputs", "partial_at"}
    callback_names = {"on_stage_end", "on_epoch_end", "on_epochs_reused"}
    unknown = set(kw) - bench_names - option_names - callback_names - {"teacher_model"}
    if unknown:
        raise TypeError(f"run_plan() got unexpected keyword arguments: {', '.join(sorted(unknown))}")
    if bench is not None and set(kw) & (bench_names | {"teacher_model"}):
        raise TypeError("run_plan(): give the device, data, teacher and caches either as a Workbench or as keywords")
    if bench is None:
        bench = Workbench.open(plan.problem, teacher=kw.get("teacher_model"),
                               **{k: v for k, v in kw.items() if k in bench_names})
    opts = {k: v for k, v in kw.items() if k in option_names}
    if opts.get("out_dir") is not None:
        opts["out_dir"] = Path(opts["out_dir"])
    if "partial_at" in opts:
        opts["partial_at"] = frozenset(opts["partial_at"])
    callbacks = {k: v for k, v in kw.items() if k in callback_names}
    if callbacks and on_event is None:
        on_event = from_callbacks(**callbacks)
    return bench, options if options is not None else RunOptions(**opts), on_event


def evaluate_test(plan: Plan, result: RunResult, device: torch.device | str | None = None,
                  precision: str = "auto") -> EvalResult:
    """Test accuracy of a finished run's student: the explicit evaluation call, never made in a search."""
    if result.student is None:
        raise ValueError("the run did not keep its student (keep_student=False)")
    dev = next(result.student.parameters()).device if device is None else pick_device(str(device))
    test = load_test_split(plan.problem.dataset, result.data_info, dev)
    return evaluate(result.student, test, pick_precision(dev, precision), plan.recipe.eval_batch_size)


__all__ = ["RunOptions", "evaluate_test", "run_plan"]
