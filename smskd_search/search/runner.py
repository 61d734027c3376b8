"""``run_search``: a study of SMSKD plans, Ray Tune trials sampled by Optuna, pruned by stage.

Order of work: check the space, create (or check, on resume) the study database, ensure the
teacher, and only then start Ray, so that the dashboard can open the study and every trial finds
a trained teacher. A resume continues a study to its budget from the database alone, never from a
Tune snapshot: after a hard kill the snapshot is older than the database (stock ``Tuner.restore``
then fails with ``UpdateFinishedTrialError`` and leaves trials RUNNING). Trials that the previous
process left unfinished are marked FAIL (``interrupted``) and their plans enqueued again; each
rerun continues from the last stage checkpoint of the interrupted one.
"""

from __future__ import annotations

import logging
import math
import os
import shutil
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import optuna
import yaml
from optuna.trial import FrozenTrial, TrialState

from smskd_search.errors import UserError
from smskd_search.plan import parse_plan, save_plan
from smskd_search.search import storage as st
from smskd_search.search.pruning import StageRungs
from smskd_search.search.sampling import BASELINE_ATTR, FIXED_PLAN_ATTR, baseline_plans, suggest_plan
from smskd_search.space import LoadedSpace, Space

logger = logging.getLogger(__name__)

# Environment variables a trial worker must see as the driver does (set before Ray starts).
_PROPAGATED_ENV = ("SMSKD_TEST_ACCESS_LOG", "SMSKD_DATA_ROOT", "RAY_CHDIR_TO_TRIAL_DIR")


@dataclass
class ProgressInfo:
    """One snapshot of a running search, for a live progress line."""

    study: str
    budget: int
    done: int  # finished trials that count toward the budget (this run and earlier ones)
    complete: int
    pruned: int
    failed: int
    running: int
    best_value: float | None
    best_sequence: str | None
    elapsed_s: float

    @property
    def completed(self) -> int:  # the name the CLI reads: trials done, whatever their state
        return self.done

    @property
    def elapsed(self) -> float:
        return self.elapsed_s

    def line(self) -> str:
        best = f"best {self.best_value:.4f} {self.best_sequence}" if self.best_value is not None else "best -"
        return (f"{self.done}/{self.budget} done ({self.pruned} pruned, {self.failed} failed), "
                f"{self.running} running, {best}, {_fmt_duration(self.elapsed_s)}")


@dataclass
class LeaderboardRow:
    rank: int
    number: int
    sequence: str
    lambda_ref: float | None  # None: no reference term (one stage, or weight mode none)
    weight_mode: str | None
    normalize: str | None
    val_acc: float
    n_val: int | None
    total_epochs: int | None
    baseline: str | None
    pareto: bool = False  # on the accuracy-vs-epochs front (multi-objective studies only)


@dataclass
class SearchSummary:
    study: str
    db_path: Path
    storage_url: str
    counts: dict[str, int]  # by Optuna state; FAIL includes the interrupted ones
    n_interrupted: int  # FAIL trials the search cut short (not the plan's fault; a resume re-runs them)
    elapsed_s: float
    interrupted: bool
    stop_reason: str  # "budget", "timeout" or "interrupted"
    budget: int
    done: int
    top: list[LeaderboardRow]
    best_plan_path: Path | None
    multi_objective: bool = False
    resources_per_trial: dict[str, float] = field(default_factory=dict)
    max_concurrent: int | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def best(self) -> LeaderboardRow | None:
        return self.top[0] if self.top else None


class _DefineByRun:
    """The define-by-run space handed to Optuna through Tune (a class: Tune pickles its searcher)."""

    def __init__(self, space: Space, teacher_sha256: str, threads: int, runs_dir: Path, study: str,
                 rung_epochs: list[int] | None = None):
        self.space = space
        self.teacher_sha256 = teacher_sha256
        self.threads = threads
        self.runs_dir = runs_dir
        self.study = study
        self.rung_epochs = list(rung_epochs or [])

    def __call__(self, trial: Any) -> dict[str, Any]:
        plan = suggest_plan(trial, self.space, self.teacher_sha256, name=f"{self.study}-trial{trial.number}")
        run_dir = self.runs_dir / f"{trial.number:05d}"
        for key, value in {
            st.ATTR_PLAN: plan.to_yaml(),
            st.ATTR_SEQUENCE: plan.sequence(),
            st.ATTR_TOTAL_EPOCHS: plan.total_epochs,
            st.ATTR_THREADS: self.threads,
            st.ATTR_RUN_DIR: str(run_dir),
        }.items():
            trial.set_user_attr(key, value)
        return {
            "plan_yaml": plan.to_yaml(),
            "run_dir": str(run_dir),
            "resume_dirs": [str(self.runs_dir / f"{int(n):05d}") for n in trial.user_attrs.get(st.ATTR_RESUME_FROM, [])],
            "threads": self.threads,
            # A baseline is measured in full: it is what the sequences must beat, never pruned.
            "baseline": trial.user_attrs.get(BASELINE_ATTR),
            # Cumulative epochs at which the trial also reports mid-stage (pruning at the rungs).
            "rung_epochs": self.rung_epochs,
        }


def _trial_dirname(trial: Any) -> str:
    return f"t{trial.trial_id}"


def _fmt_duration(seconds: float) -> str:
    s = int(round(seconds))
    return f"{s // 60}m {s % 60:02d}s" if s >= 60 else f"{seconds:.1f}s"


def _make_sampler(space: Space, seed: int) -> optuna.samplers.BaseSampler:
    search = space.search
    assert search is not None
    if search.sampler.kind == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    with warnings.catch_warnings():
        # multivariate/group/constant_liar are "experimental" in name only; they are what a
        # conditional space searched by parallel workers needs.
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return optuna.samplers.TPESampler(seed=seed, n_startup_trials=search.sampler.n_startup_trials,
                                          multivariate=True, group=True, constant_liar=True)


def _retried(trials: list[FrozenTrial]) -> set[int]:
    """Numbers of interrupted trials that have a rerun (in any state)."""
    return {int(t.user_attrs[st.ATTR_RETRY_OF]) for t in trials if t.user_attrs.get(st.ATTR_RETRY_OF) is not None}


def _enqueue_retries(study: optuna.Study) -> list[int]:
    """Enqueue the plan of every interrupted trial that has no rerun yet; returns their numbers."""
    trials = study.get_trials(deepcopy=False)
    retried = _retried(trials)
    out = []
    for t in trials:
        if t.state == TrialState.FAIL and t.user_attrs.get(st.ATTR_INTERRUPTED) and t.number not in retried:
            attrs = {k: t.user_attrs[k] for k in (BASELINE_ATTR, FIXED_PLAN_ATTR) if k in t.user_attrs}
            attrs[st.ATTR_RETRY_OF] = t.number
            attrs[st.ATTR_RESUME_FROM] = [t.number, *t.user_attrs.get(st.ATTR_RESUME_FROM, [])]
            study.enqueue_trial(t.params, user_attrs=attrs)
            out.append(t.number)
    return out


def _clean_run_dirs(study: optuna.Study, runs_dir: Path) -> None:
    """Drop stage checkpoints nobody will resume from (finished trials, rerun interrupted ones)."""
    if not runs_dir.is_dir():
        return
    trials = study.get_trials(deepcopy=False)
    # An interrupted trial's checkpoints stay until a rerun of its plan has finished for good.
    settled = {int(n) for t in trials if st.counts_toward_budget(t) for n in t.user_attrs.get(st.ATTR_RESUME_FROM, [])}
    for t in trials:
        d = runs_dir / f"{t.number:05d}"
        if not d.exists() or t.state in (TrialState.RUNNING, TrialState.WAITING):
            continue
        if t.user_attrs.get(st.ATTR_INTERRUPTED) and t.number not in settled:
            continue
        shutil.rmtree(d, ignore_errors=True)


def _budget_done(trials: list[FrozenTrial]) -> int:
    return sum(1 for t in trials if st.counts_toward_budget(t))


def _counts_this_kind(trials: list[FrozenTrial]) -> tuple[int, int, int]:
    complete = sum(1 for t in trials if t.state == TrialState.COMPLETE)
    pruned = sum(1 for t in trials if t.state == TrialState.PRUNED)
    failed = sum(1 for t in trials if t.state == TrialState.FAIL and not t.user_attrs.get(st.ATTR_INTERRUPTED))
    return complete, pruned, failed


def _best_of(trials: list[FrozenTrial]) -> tuple[float | None, str | None]:
    done = [t for t in trials if t.state == TrialState.COMPLETE and t.values]
    if not done:
        return None, None
    best = max(done, key=lambda t: t.values[0])
    return best.values[0], best.user_attrs.get(st.ATTR_SEQUENCE)


def _progress_callback_class():
    from smskd_search.search._ray import tune

    class _Progress(tune.Callback):
        """Counts and best value from Tune's own trial objects (no database reads while running)."""

        def __init__(self, emit: Callable[[ProgressInfo], None], study: str, budget: int,
                     before: list[FrozenTrial], start: float):
            self.emit = emit
            self.study = study
            self.budget = budget
            self.start = start
            self.complete, self.pruned, self.failed = _counts_this_kind(before)
            self.best_value, self.best_sequence = _best_of(before)
            self.running = 0
            self._last = 0.0
            self._seen: set[str] = set()

        def _info(self) -> ProgressInfo:
            return ProgressInfo(self.study, self.budget, self.complete + self.pruned + self.failed,
                                self.complete, self.pruned, self.failed, self.running, self.best_value,
                                self.best_sequence, time.monotonic() - self.start)

        def _send(self, force: bool = False) -> None:
            now = time.monotonic()
            if force or now - self._last >= 1.0:
                self._last = now
                try:
                    self.emit(self._info())
                except Exception:  # noqa: BLE001 - a display problem must not stop the search
                    logger.debug("progress callback failed", exc_info=True)

        def _count_running(self, trials: list, ended: Any = None) -> None:
            # Tune calls the trial hooks before it changes the ended trial's status.
            self.running = sum(1 for t in trials if t.status == "RUNNING" and t is not ended)

        def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
            if trial.trial_id in self._seen:
                return
            self._seen.add(trial.trial_id)
            self._count_running(trials, trial)
            r = trial.last_result or {}
            if r.get("error"):
                self.failed += 1
            elif r.get("final"):
                self.complete += 1
                v = r.get("val_acc")
                if v is not None and not math.isnan(v) and (self.best_value is None or v > self.best_value):
                    self.best_value = float(v)
                    self.best_sequence = " -> ".join(f"{s.get('method')}({s.get('epochs')})"
                                                     for s in (yaml.safe_load(trial.config.get("plan_yaml", ""))
                                                               or {}).get("stages", []))
            elif "val_acc" in r:
                self.pruned += 1
            self._send(force=True)

        def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
            if trial.trial_id not in self._seen:
                self._seen.add(trial.trial_id)
                self._count_running(trials, trial)
                self.failed += 1
                self._send(force=True)

        def on_step_end(self, iteration: int, trials: list, **info: Any) -> None:
            before = self.running
            self._count_running(trials)
            self._send(force=self.running != before)

    return _Progress


def _resources(cluster: dict[str, float], space: Space, cpus_per_trial: float | None,
               gpus_per_trial: float | None, max_concurrent: int | None,
               notes: list[str]) -> tuple[dict[str, float], str, int]:
    cpus, gpus = float(cluster.get("CPU", 0.0)), float(cluster.get("GPU", 0.0))
    cpt = float(cpus_per_trial if cpus_per_trial is not None else space.runtime.cpus_per_trial)
    if cpt <= 0:
        raise UserError(f"--cpus-per-trial must be > 0 (got {cpt:g})")
    if cpus and cpt > cpus:
        raise UserError(f"--cpus-per-trial {cpt:g} exceeds the cluster's {cpus:g} CPUs")
    gpt = float(gpus_per_trial if gpus_per_trial is not None else space.runtime.gpus_per_trial)
    if gpus > 0 and gpt > 0:
        if gpt > gpus:
            raise UserError(f"--gpus-per-trial {gpt:g} exceeds the cluster's {gpus:g} GPUs")
        resources, device = {"cpu": cpt, "gpu": gpt}, "cuda"
        fit = min(math.floor(gpus / gpt + 1e-9), math.floor(cpus / cpt + 1e-9))
    else:
        if gpus_per_trial:
            notes.append(f"--gpus-per-trial {gpus_per_trial:g} ignored: the Ray cluster has no GPU")
        resources, device = {"cpu": cpt}, "cpu"
        fit = math.floor(cpus / cpt + 1e-9)
    concurrent = max_concurrent if max_concurrent is not None else max(1, fit)
    if concurrent < 1:
        raise UserError(f"--max-concurrent must be >= 1 (got {concurrent})")
    return resources, device, concurrent


def _start_ray(address: str | None, notes: list[str]) -> bool:
    from smskd_search.search._ray import ENV_DEFAULTS, ray

    if ray.is_initialized():
        return False
    env_vars = {k: os.environ[k] for k in (*_PROPAGATED_ENV, *ENV_DEFAULTS) if k in os.environ}
    try:
        ray.init(address=address or "local", include_dashboard=False, log_to_driver=False,
                 logging_level=logging.WARNING, runtime_env={"env_vars": env_vars})
    except ConnectionError as exc:
        raise UserError(f"--address {address}: cannot connect to a Ray cluster: {exc}") from None
    return True


def _quiet_ray_loggers() -> None:
    # Tune logs an error line for every trial still running at a Ctrl-C or time budget ("Trials did
    # not complete"); the summary says it once, in words.
    for name in ("ray.tune.tune", "ray.tune.execution.tune_controller", "ray.tune.execution.experiment_state"):
        logging.getLogger(name).setLevel(logging.CRITICAL)
    logging.getLogger("ray").setLevel(logging.ERROR)


def run_search(
    space: LoadedSpace,
    *,
    budget: int = 50,
    study: str | None = None,
    studies_dir: Path = Path("studies"),
    max_concurrent: int | None = None,
    cpus_per_trial: float | None = None,
    gpus_per_trial: float | None = None,
    address: str | None = None,
    seed: int = 0,
    timeout: float | None = None,
    resume: bool = False,
    prune: bool = True,
    baselines: bool = True,
    on_progress: Callable[[ProgressInfo], None] | None = None,
    on_teacher_epoch: Callable[[int, int, float, float], None] | None = None,
) -> SearchSummary:
    """Search the space's plans; see the module docstring. Returns the study's summary.

    ``budget`` is the study's total number of finished trials (earlier runs included on resume;
    trials the search itself cut short do not count and are run again). Ctrl-C stops cleanly:
    finished trials stay, and the summary says ``interrupted``.
    """
    start = time.monotonic()
    sp = space.space
    if sp.search is None:
        raise UserError(f"{space.path}: the space has no 'search' part: nothing to search over")
    search = sp.search
    if budget < 1:
        raise UserError(f"--budget must be >= 1 (got {budget})")
    if timeout is not None and timeout <= 0:
        raise UserError(f"--timeout must be > 0 seconds (got {timeout:g})")
    name = st.check_study_name(study or st.study_name_from(sp.name))
    studies_dir = Path(studies_dir)
    studies_dir.mkdir(parents=True, exist_ok=True)
    path = st.db_path(studies_dir, name)
    if not resume and path.exists() and path.stat().st_size > 0:
        raise UserError(f"study {name} already exists in {path}; use --resume or another --study")
    notes: list[str] = []

    lock = st.StudyLock(studies_dir, name).acquire()
    optuna_verbosity = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # the progress line and summary say it all
    try:
        from smskd_search.engine import ensure_teacher, pick_device

        # The study file first, so that the dashboard can open it while the teacher trains.
        if resume:
            study_obj = st.load_study_for_resume(space, studies_dir, name, budget=budget)
        else:
            study_obj = st.create_study(space, studies_dir, name, seed=seed, budget=budget)
        try:
            teacher = ensure_teacher(sp.problem, cache_root=studies_dir / "teachers", device=pick_device(None),
                                     on_epoch=on_teacher_epoch)
        except BaseException:
            if not resume and not study_obj.get_trials(deepcopy=False):
                path.unlink(missing_ok=True)  # nothing ran: the name stays free for the next attempt
            raise
        st.bind_teacher(study_obj, teacher_path=teacher.path, teacher_sha256=teacher.sha256)
        if resume:
            orphans = st.fail_orphans(study_obj, "interrupted: the search process ended while this trial ran")
            if orphans:
                notes.append(f"marked {len(orphans)} trial(s) left running by the previous process FAIL "
                             f"(interrupted): {orphans}")
        runs_dir = (studies_dir / name / "trials").resolve()
        before = study_obj.get_trials(deepcopy=False)
        remaining = budget - _budget_done(before)
        if remaining > 0:
            retries = _enqueue_retries(study_obj)
            if retries:
                notes.append(f"re-running interrupted trial(s) {retries} from their last stage checkpoint")
            if baselines:
                present = {t.user_attrs.get(BASELINE_ATTR) for t in before}
                waiting = sum(1 for t in study_obj.get_trials(deepcopy=False, states=(TrialState.WAITING,)))
                room = max(0, remaining - waiting)
                for b in baseline_plans(sp, teacher.sha256):
                    if b.label in present:
                        continue
                    if room <= 0:
                        notes.append(f"budget too small for baseline {b.label}")
                        continue
                    study_obj.enqueue_trial(b.params or {}, user_attrs=b.user_attrs)
                    room -= 1
        _clean_run_dirs(study_obj, runs_dir)

        summary_kwargs: dict[str, Any] = {}
        interrupted_by_signal = False
        if remaining > 0:
            interrupted_by_signal, summary_kwargs = _run_tune(
                space, study_obj, name=name, studies_dir=studies_dir, runs_dir=runs_dir, teacher=teacher,
                remaining=remaining, budget=budget, before=before, max_concurrent=max_concurrent,
                cpus_per_trial=cpus_per_trial, gpus_per_trial=gpus_per_trial, address=address,
                seed=seed + len(before), timeout=timeout, prune=prune, on_progress=on_progress,
                start=start, notes=notes,
            )
        _clean_run_dirs(study_obj, runs_dir)
        elapsed = time.monotonic() - start
        trials = study_obj.get_trials(deepcopy=False)
        done = _budget_done(trials)
        if done >= budget:
            reason = "budget"
        elif timeout is not None and not interrupted_by_signal and elapsed >= timeout:
            reason = "timeout"
        else:
            reason = "interrupted"
        multi = bool(search.objective.cost_objective)
        top = _leaderboard(study_obj, trials, multi)
        best_path = None
        if top:
            best_trial = next(t for t in trials if t.number == top[0].number)
            best_path = _write_best_plan(best_trial, studies_dir / name / "best.yaml", name, space)
        return SearchSummary(
            study=name, db_path=path, storage_url=st.storage_url(path), counts=st.counts_by_state(trials),
            n_interrupted=sum(1 for t in trials if t.state == TrialState.FAIL and t.user_attrs.get(st.ATTR_INTERRUPTED)),
            elapsed_s=elapsed, interrupted=done < budget, stop_reason=reason, budget=budget, done=done,
            top=top, best_plan_path=best_path, multi_objective=multi, notes=notes, **summary_kwargs,
        )
    finally:
        optuna.logging.set_verbosity(optuna_verbosity)
        lock.release()


def _run_tune(space: LoadedSpace, study_obj: optuna.Study, *, name: str, studies_dir: Path, runs_dir: Path,
              teacher: Any, remaining: int, budget: int, before: list[FrozenTrial], max_concurrent: int | None,
              cpus_per_trial: float | None, gpus_per_trial: float | None, address: str | None, seed: int,
              timeout: float | None, prune: bool, on_progress: Callable[[ProgressInfo], None] | None,
              start: float, notes: list[str]) -> tuple[bool, dict[str, Any]]:
    """One Tune run of ``remaining`` trials on the study; returns (stopped by a signal, summary fields)."""
    from dataclasses import asdict

    from smskd_search.search._ray import ray, tune
    from smskd_search.search.scheduler import StageASHAScheduler
    from smskd_search.search.searcher import StageAwareOptunaSearch
    from smskd_search.search.trainable import TrialContext, train_trial

    sp = space.space
    search = sp.search
    assert search is not None
    multi = bool(search.objective.cost_objective)
    started = _start_ray(address, notes)
    _quiet_ray_loggers()
    interrupted = False
    searcher: StageAwareOptunaSearch | None = None
    try:
        resources, device, concurrent = _resources(ray.cluster_resources(), sp, cpus_per_trial, gpus_per_trial,
                                                   max_concurrent, notes)
        threads = max(1, int(resources["cpu"]))
        scheduler = None
        if prune and search.pruning.enabled and not multi:
            scheduler = StageASHAScheduler(_rungs_for(search, before))
        elif prune and multi:
            notes.append("pruning is off for the accuracy-vs-cost (multi-objective) search")
        rung_epochs = (scheduler.rungs.milestones
                       if scheduler is not None and search.pruning.decide_at == "rungs" else [])
        define = _DefineByRun(sp, teacher.sha256, threads, runs_dir, name, rung_epochs)
        searcher = StageAwareOptunaSearch(
            define,
            metric=["val_acc", "total_epochs"] if multi else "val_acc",
            mode=["max", "min"] if multi else "max",
            sampler=_make_sampler(sp, seed),
            study_name=name,
            storage=st.open_storage(st.db_path(studies_dir, name)),
            pruning=scheduler is not None,
            stop_reason=scheduler.stop_reason if scheduler is not None else None,
        )
        context = TrialContext(teacher_record=asdict(teacher), device=device)
        trainable = tune.with_resources(tune.with_parameters(train_trial, context=context), resources)
        time_budget = None
        if timeout is not None:
            # --timeout bounds the whole search, and the teacher and Ray's start already took some.
            time_budget = timeout - (time.monotonic() - start)
            if time_budget <= 0:
                return False, {"resources_per_trial": resources, "max_concurrent": concurrent}
        callbacks = []
        if on_progress is not None:
            callbacks.append(_progress_callback_class()(on_progress, name, budget, before, start))
        tuner = tune.Tuner(
            trainable,
            tune_config=tune.TuneConfig(
                search_alg=searcher, scheduler=scheduler, num_samples=remaining,
                max_concurrent_trials=concurrent, reuse_actors=True, time_budget_s=time_budget,
                trial_dirname_creator=_trial_dirname,
            ),
            run_config=tune.RunConfig(
                name=f"run-{time.strftime('%Y%m%d-%H%M%S')}",
                storage_path=str((studies_dir / name / "ray").resolve()),
                verbose=0,
                callbacks=callbacks,
                failure_config=tune.FailureConfig(max_failures=1),
                # No num_to_keep: with it, Tune snapshots the whole experiment (searcher included)
                # whenever a trial has checkpointed that many times, i.e. at almost every stage end.
                checkpoint_config=tune.CheckpointConfig(),
            ),
        )
        try:
            tuner.fit()
        except KeyboardInterrupt:  # a second Ctrl-C while Tune was winding down
            interrupted = True
        # Tune's copies of the stage checkpoints only serve its failure recovery during the run
        # (a resume works from the study and the trial folders).
        for ckpt in (studies_dir / name / "ray").glob("run-*/*/checkpoint_*"):
            shutil.rmtree(ckpt, ignore_errors=True)
        return interrupted, {"resources_per_trial": resources, "max_concurrent": concurrent}
    finally:
        if searcher is not None:
            left = searcher.fail_unfinished("interrupted: the search stopped while this trial ran")
            if left:
                notes.append(f"{len(left)} trial(s) cut short by the stop: {left} (a --resume re-runs them)")
        if started:
            ray.shutdown()


def _rungs_for(search: Any, before: list[FrozenTrial]) -> StageRungs:
    """The space's rung rule, with the stage values of the study's finished trials already recorded.

    A resumed search then judges new trials by the standard the earlier runs set, not against empty
    rungs (which would let the first trial at each rung through whatever it scored).
    """
    max_t = search.max_total_epochs
    rungs = StageRungs(grace_period=min(search.pruning.grace_period, max_t),
                       reduction_factor=search.pruning.reduction_factor, max_t=max_t,
                       noise_margin=search.pruning.noise_margin)
    # Every report the scheduler saw (rung reports included) is an intermediate value of the trial.
    rungs.replay((f"study-trial-{t.number}", sorted(t.intermediate_values.items()))
                 for t in sorted(before, key=lambda t: t.number)
                 if t.state in (TrialState.COMPLETE, TrialState.PRUNED))
    return rungs


def _reference_fields(plan_yaml: str | None) -> tuple[float | None, str | None, str | None, int | None]:
    if not plan_yaml:
        return None, None, None, None
    data = yaml.safe_load(plan_yaml) or {}
    stages = data.get("stages") or []
    total = sum(int(s.get("epochs", 0)) for s in stages) or None
    ref = data.get("reference") or {}
    if len(stages) < 2:
        return None, None, None, total
    mode = ref.get("weight_mode")
    if mode == "none":
        return None, mode, None, total
    return ref.get("lambda_ref"), mode, ref.get("normalize"), total


def _leaderboard(study_obj: optuna.Study, trials: list[FrozenTrial], multi: bool) -> list[LeaderboardRow]:
    done = [t for t in trials if t.state == TrialState.COMPLETE and t.values]
    front: set[int] = set()
    if multi:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            front = {t.number for t in study_obj.best_trials}
        # The Pareto front first (by accuracy), then the rest: a cheaper plan is only better if it
        # is not dominated.
        done.sort(key=lambda t: (t.number not in front, -t.values[0], t.values[1] if len(t.values) > 1 else 0))
    else:
        done.sort(key=lambda t: (-t.values[0], t.number))
    rows = []
    for rank, t in enumerate(done, start=1):
        lam, mode, norm, total = _reference_fields(t.user_attrs.get(st.ATTR_PLAN))
        rows.append(LeaderboardRow(
            rank=rank, number=t.number, sequence=t.user_attrs.get(st.ATTR_SEQUENCE, "?"), lambda_ref=lam,
            weight_mode=mode, normalize=norm, val_acc=float(t.values[0]), n_val=t.user_attrs.get(st.ATTR_N_VAL),
            total_epochs=t.user_attrs.get(st.ATTR_TOTAL_EPOCHS, total), baseline=t.user_attrs.get(BASELINE_ATTR),
            pareto=multi and t.number in front,
        ))
    return rows


def _write_best_plan(trial: FrozenTrial, path: Path, study: str, space: LoadedSpace) -> Path | None:
    text = trial.user_attrs.get(st.ATTR_PLAN)
    if not text:
        return None
    plan = parse_plan(yaml.safe_load(text), source=f"trial {trial.number} plan")
    plan = plan.model_copy(update={
        "name": f"{study}-best",
        "provenance": {
            "study": study, "trial": trial.number, "val_acc": trial.values[0] if trial.values else None,
            "n_val": trial.user_attrs.get(st.ATTR_N_VAL), "threads": trial.user_attrs.get(st.ATTR_THREADS),
            "space_sha256": space.sha256,
        },
    })
    return save_plan(plan, path)


def _stderr(p: float, n: int | None) -> float | None:
    if not n:
        return None
    return math.sqrt(max(p * (1.0 - p), 0.0) / n)


def format_leaderboard(summary: SearchSummary, top: int = 10) -> str:
    """The summary as text: the top plans, the noise floor, where the study and best plan are."""
    lines: list[str] = []
    rows = summary.top[:top]
    if rows:
        def acc_cell(r: LeaderboardRow) -> str:
            se = _stderr(r.val_acc, r.n_val)
            return (f"{r.val_acc:.4f}" + (f" ± {se:.4f}" if se is not None else "")
                    + (f" (n={r.n_val})" if r.n_val else ""))

        columns: list[tuple[str, list[str], str]] = [
            ("rank", [f"{r.rank}{'*' if r.pareto else ''}" for r in rows], ">"),
            ("trial", [f"#{r.number}" for r in rows], "<"),
            ("val acc", [acc_cell(r) for r in rows], "<"),
            ("epochs", ["-" if r.total_epochs is None else str(r.total_epochs) for r in rows], ">"),
            ("lambda_ref", ["-" if r.lambda_ref is None else f"{r.lambda_ref:.3g}" for r in rows], "<"),
            ("mode", [(r.weight_mode or "-") + ("+bm" if r.normalize == "batch_mean" else "") for r in rows], "<"),
        ]
        widths = [max(len(title), *(len(c) for c in cells)) for title, cells, _ in columns]
        lines.append("  ".join(f"{title:{align}{w}}" for (title, _, align), w in zip(columns, widths)) + "  stages")
        for i, r in enumerate(rows):
            cells = "  ".join(f"{col[1][i]:{col[2]}{w}}" for col, w in zip(columns, widths))
            lines.append(f"{cells}  {r.sequence}" + (f"   [baseline {r.baseline}]" if r.baseline else ""))
        if summary.multi_objective:
            lines.append("* on the Pareto front of val accuracy (max) vs total epochs (min)")
        best = max(rows, key=lambda r: r.val_acc)
        baselines = [r for r in summary.top if r.baseline]
        se = _stderr(best.val_acc, best.n_val)
        if baselines and not best.baseline and se is not None:
            rival = max(baselines, key=lambda r: r.val_acc)
            margin = best.val_acc - rival.val_acc
            # Two independent accuracies on the same split size: the s.e. of the difference.
            se_diff = math.sqrt(se**2 + (_stderr(rival.val_acc, rival.n_val) or 0.0) ** 2)
            verdict = "inside the noise: not a demonstrated gain" if margin <= 2 * se_diff else "beyond 2 s.e."
            lines.append(f"best vs best baseline ({rival.baseline}): {margin:+.4f}, s.e. of the gap "
                         f"{se_diff:.4f}: {verdict}; claim gains only with `verify` on the test split")
        elif se is not None:
            lines.append(f"noise floor: one standard error of the best val acc is {se:.4f} (n={best.n_val})")
    else:
        lines.append("no completed trial yet")
    c = summary.counts
    trials_word = (f"{summary.done}/{summary.budget} trials: {c.get('COMPLETE', 0)} complete, "
                   f"{c.get('PRUNED', 0)} pruned, {c.get('FAIL', 0) - summary.n_interrupted} failed")
    if summary.n_interrupted:
        trials_word += f" (+{summary.n_interrupted} cut short by a stop)"
    lines.append("")
    lines.append(f"study:     {summary.study} ({summary.db_path}): {trials_word}, {_fmt_duration(summary.elapsed_s)}")
    if summary.interrupted:
        why = {"timeout": "--timeout reached", "interrupted": "interrupted"}.get(summary.stop_reason,
                                                                               summary.stop_reason)
        lines.append(f"stopped:   {why} before the budget; continue with --resume --study {summary.study}")
    if summary.best_plan_path is not None:
        lines.append(f"best plan: {summary.best_plan_path}")
    lines.append(f"dashboard: optuna-dashboard {summary.storage_url}")
    return "\n".join(lines)


__all__ = ["LeaderboardRow", "ProgressInfo", "SearchSummary", "format_leaderboard", "run_search"]
