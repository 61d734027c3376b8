"""One Tune run of a study's next trials: the searcher, the scheduler, the trainable and Ray.

:func:`run_tune` takes the search's :class:`TuneSettings` and this run's :class:`TuneRound`, and
returns a :class:`TuneOutcome`; it starts Ray (unless this process already has it) and shuts down
what it started.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import optuna
from optuna.trial import FrozenTrial, TrialState

from smskd_search.data.sources import absolute_root
from smskd_search.engine import TeacherRecord
from smskd_search.search import confirm as cf
from smskd_search.search import storage_fs as sfs
from smskd_search.search.cluster import TrialResources, quiet_ray_loggers, start_ray, trial_resources
from smskd_search.search.lifecycle import StudySession
from smskd_search.search.progress import ProgressInfo, progress_callback
from smskd_search.search.pruning import StageRungs
from smskd_search.search.record import TrialAttrs, TrialConfig, write_trial_attrs
from smskd_search.search.sampling import suggest_plan
from smskd_search.search.teacher_transport import pack
from smskd_search.search_settings import ConfirmSettings, SearchSettings
from smskd_search.space import SearchSpec, Space

if TYPE_CHECKING:
    from smskd_search.search.scheduler import StageASHAScheduler
    from smskd_search.search.searcher import StudySearcher
    from smskd_search.search.trainable import TrialContext


class PlanConfigs:
    """The define-by-run function: samples a plan on an Optuna trial and returns its Tune config.

    A class, not a closure: Tune pickles its searcher.
    """

    def __init__(self, space: Space, teacher_sha256: str, threads: int, runs_dir: str | Path, study: str,
                 rung_epochs: list[int] | None = None):
        self.space = space
        self.teacher_sha256 = teacher_sha256
        self.threads = threads
        self.runs_dir = str(runs_dir)  # a folder or a URI (storage_fs.join makes its children)
        self.study = study
        self.rung_epochs = list(rung_epochs or [])
        # A relative dataset root means the driver's working directory: made absolute here, on the
        # driver, and sent beside the plan (whose stored text keeps the space's own root).
        self.data_root = absolute_root(space.problem.dataset.root)

    def __call__(self, trial: optuna.Trial) -> dict[str, Any]:
        plan = suggest_plan(trial, self.space, self.teacher_sha256, name=f"{self.study}-trial{trial.number}")
        run_dir = sfs.join(self.runs_dir, f"{trial.number:05d}")
        write_trial_attrs(trial, TrialAttrs(plan_yaml=plan.to_yaml(), sequence=plan.sequence(),
                                            total_epochs=plan.total_epochs, threads=self.threads, run_dir=run_dir,
                                            data_root=self.data_root))
        enqueued = TrialAttrs.of(trial)
        confirmation = enqueued.confirm_of is not None
        return TrialConfig(
            plan_yaml=plan.to_yaml(), sequence=plan.sequence(), plan_key=plan.canonical_hash(), run_dir=run_dir,
            resume_dirs=[sfs.join(self.runs_dir, f"{n:05d}") for n in enqueued.resume_from or ()],
            threads=self.threads, baseline=enqueued.baseline,
            # A confirmation run is measured in full: no rung reports.
            rung_epochs=[] if confirmation else list(self.rung_epochs), data_root=self.data_root,
            confirmation=confirmation,
        ).to_dict()


def make_sampler(space: Space, seed: int) -> optuna.samplers.BaseSampler:
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


def rungs_for(search: SearchSpec, before: list[FrozenTrial]) -> StageRungs:
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


@dataclass(frozen=True)
class TuneSettings:
    """What every Tune run of one search shares.

    Args:
        settings: The search's settings (resource requests, address, cache, deterministic, timeout).
        space: The space searched.
        session: The open study (its lock held by the caller).
        teacher: The study's teacher, trained or loaded.
        start: ``time.monotonic()`` at the search's start (for the progress line and the timeout).
        on_progress: Called with a :class:`ProgressInfo` when the counts change.
    """

    settings: SearchSettings
    space: Space
    session: StudySession
    teacher: TeacherRecord
    start: float = field(default_factory=time.monotonic)
    on_progress: Callable[[ProgressInfo], None] | None = None

    @property
    def deadline(self) -> float | None:
        """``time.monotonic()`` after which no trial starts (None: no limit)."""
        return None if self.settings.timeout is None else self.start + self.settings.timeout

    @property
    def cache_dir(self) -> str | None:
        """The stage-prefix cache's folder or URI (``<storage>/cache``); None: no stage cache."""
        return sfs.join(self.session.storage_root, "cache") if self.settings.cache else None


@dataclass(frozen=True)
class TuneRound:
    """One Tune run's own part.

    Args:
        trials: Trials to run in this Tune run.
        budget: The whole to count them against (for the progress line).
        before: The study's trials before this run.
        seed: The sampler's seed for this run.
        prune: Whether the space's pruning applies.
        phase: ``"search"``, or ``"confirm"`` for the confirmation runs (enqueued, never pruned).
        confirm: In a ``search`` run: once its last trial is handed out, the confirmation runs the
            budget's last trials can no longer change are enqueued and run in this run's workers
            (:func:`~smskd_search.search.confirm.settled`); None: none here.
    """

    trials: int
    budget: int
    before: list[FrozenTrial]
    seed: int
    prune: bool = True
    phase: str = "search"
    confirm: ConfirmSettings | None = None


@dataclass
class TuneOutcome:
    """What a Tune run learned, besides the study it wrote."""

    resources: TrialResources | None
    interrupted: bool  # a second Ctrl-C reached us while Tune was winding down
    notes: list[str] = field(default_factory=list)
    # The sampler proposed only finished plans MAX_REPEATS_IN_A_ROW times in a row: no new plan to train.
    exhausted: bool = False


def run_tune(s: TuneSettings, r: TuneRound) -> TuneOutcome:
    """Run ``r.trials`` trials of the study on Ray; see the module docstring."""
    from smskd_search.search._ray import ray

    notes: list[str] = []
    started = start_ray(s.settings.address, s.session.storage_root)
    quiet_ray_loggers()
    searcher: StudySearcher | None = None
    try:
        resources = trial_resources(ray.cluster_resources(), s.space.runtime, s.settings.cpus_per_trial,
                                    s.settings.gpus_per_trial, s.settings.trials_at_once)
        notes += resources.notes
        scheduler = _scheduler(s.space, r, notes)
        searcher = _searcher(s, r, resources, scheduler)
        time_budget = None
        if s.deadline is not None:
            # The deadline bounds the whole search, and the teacher and Ray's start already took some.
            time_budget = s.deadline - time.monotonic()
            if time_budget <= 0:
                return TuneOutcome(resources, False, notes)
        ray_dir = sfs.join(s.session.storage_root, s.session.name, "ray")
        interrupted = _fit(_tuner(s, r, resources, searcher, scheduler, time_budget, ray_dir))
        _drop_tune_checkpoints(ray_dir)
        return TuneOutcome(resources, interrupted, notes, exhausted=searcher.exhausted)
    finally:
        if searcher is not None:
            left = searcher.fail_unfinished("interrupted: the search stopped while this trial ran")
            if left:
                notes.append(f"{len(left)} trial(s) cut short by the stop: {left} (a --resume re-runs them)")
        if started:
            ray.shutdown()


def _scheduler(space: Space, r: TuneRound, notes: list[str]) -> StageASHAScheduler | None:
    """The stage-level pruner, or None (pruning off, or a multi-objective search: said in ``notes``)."""
    from smskd_search.search.scheduler import StageASHAScheduler

    search = space.search
    assert search is not None
    multi = bool(search.objective.cost_objective)
    if r.prune and search.pruning.enabled and not multi:
        return StageASHAScheduler(rungs_for(search, r.before))
    if r.prune and multi:
        notes.append("pruning is off for the accuracy-vs-cost (multi-objective) search")
    return None


def _searcher(s: TuneSettings, r: TuneRound, resources: TrialResources,
              scheduler: StageASHAScheduler | None) -> StudySearcher:
    """The study's searcher for this run, its sampler seeded by ``r.seed``."""
    from smskd_search.search.searcher import StudySearcher

    search = s.space.search
    assert search is not None
    rung_epochs = (scheduler.rungs.milestones
                   if scheduler is not None and search.pruning.decide_at == "rungs" else [])
    configs = PlanConfigs(s.space, s.teacher.sha256, resources.threads, s.session.runs_dir, s.session.name,
                          rung_epochs)
    s.session.study.sampler = make_sampler(s.space, r.seed)
    confirm = r.confirm

    def follow_up() -> int:
        assert confirm is not None
        return cf.enqueue_settled(s.session, s.space.seed, confirm)

    return StudySearcher(s.session.study, configs, pruning=scheduler is not None,
                         stop_reason=scheduler.stop_reason if scheduler is not None else None,
                         max_trials=r.trials,
                         # A plan once more rather than a new one: the next ask explores.
                         explore=optuna.samplers.RandomSampler(seed=r.seed + 1),
                         follow_up=follow_up if confirm is not None else None,
                         confirmations_off_budget=r.phase == "search")


def _most_confirmation_runs(confirm: ConfirmSettings | None) -> int:
    return 0 if confirm is None else (confirm.plans + confirm.baselines) * confirm.seeds


def trial_context(s: TuneSettings, resources: TrialResources) -> TrialContext:
    """What every trial of the search is handed (through Ray's object store, once)."""
    from smskd_search.search.trainable import TrialContext

    return TrialContext(teacher=pack(s.teacher), device=resources.device, cache_dir=s.cache_dir,
                        cache_max_bytes=s.settings.cache_max_bytes, deterministic=s.settings.deterministic,
                        gpu_share=float(resources.per_trial.get("gpu", 0.0)), cuda_graphs=s.settings.cuda_graphs)


def _tuner(s: TuneSettings, r: TuneRound, resources: TrialResources, searcher: StudySearcher,
           scheduler: StageASHAScheduler | None, time_budget: float | None, ray_dir: str) -> Any:
    """The Tuner of this run: the trainable with its resources, the searcher, the scheduler, the callbacks."""
    from smskd_search.search._ray import tune
    from smskd_search.search.trainable import train_trial

    context = trial_context(s, resources)
    trainable = tune.with_resources(tune.with_parameters(train_trial, context=context), resources.per_trial)
    callbacks = []
    if s.on_progress is not None:
        answered = searcher.answered
        callbacks.append(progress_callback(s.on_progress, s.session.name, r.budget, r.before, s.start,
                                           answered=lambda: len(answered), phase=r.phase,
                                           confirm_runs=lambda: searcher.followed,
                                           budget_handed_out=lambda: searcher.budget_handed_out))
    # A URI goes to Tune as its filesystem and the path inside it (Tune's own way to take one).
    fs, ray_path = sfs.filesystem(ray_dir) if sfs.is_uri(ray_dir) else (None, ray_dir)
    return tune.Tuner(
        trainable,
        tune_config=tune.TuneConfig(
            search_alg=searcher, scheduler=scheduler,
            # Tune creates at most num_samples trials: room for the confirmation runs after the budget,
            # and for those a stopped search left waiting (handed off the budget, see StudySearcher).
            num_samples=r.trials + _most_confirmation_runs(r.confirm)
            + (cf.waiting(s.session.trials()) if r.phase == "search" else 0),
            max_concurrent_trials=resources.concurrent, reuse_actors=True, time_budget_s=time_budget,
            trial_dirname_creator=_trial_dirname,
        ),
        run_config=tune.RunConfig(
            name=f"run-{time.strftime('%Y%m%d-%H%M%S')}",
            storage_path=ray_path,
            storage_filesystem=fs,
            verbose=0,
            callbacks=callbacks,
            failure_config=tune.FailureConfig(max_failures=1),
            # No num_to_keep: with it, Tune snapshots the whole experiment (searcher included)
            # whenever a trial has checkpointed that many times, i.e. at almost every stage end.
            checkpoint_config=tune.CheckpointConfig(),
        ),
    )


def _fit(tuner: Any) -> bool:
    """Run the Tuner; True if a second Ctrl-C reached us while Tune was winding down."""
    try:
        tuner.fit()
    except KeyboardInterrupt:
        return True
    return False


def _drop_tune_checkpoints(ray_dir: str) -> None:
    # Tune's copies of the stage checkpoints only serve its failure recovery during the run
    # (a resume works from the study and the trial folders).
    for rel, _, _, is_dir in sfs.listing(ray_dir, recursive=True):
        parts = rel.split("/")
        if is_dir and len(parts) == 3 and parts[0].startswith("run-") and parts[2].startswith("checkpoint_"):
            sfs.remove(sfs.join(ray_dir, rel))


def _trial_dirname(trial: Any) -> str:
    return f"t{trial.trial_id}"


__all__ = ["PlanConfigs", "TuneOutcome", "TuneRound", "TuneSettings", "make_sampler", "rungs_for", "run_tune"]
