"""The phases of a search, in order: prepare, teacher, budget, confirmation, summary.

:func:`prepare` checks everything that can be checked before a file is written (the study name,
the storage, the cluster's address), then holds the study's lock for the search; :func:`teacher`
creates (or opens, on resume) the study file, so that the dashboard can open it while the teacher
trains, and ensures the teacher; only then does Ray run trials: :func:`budget` until the budget is
met (with retries of infrastructure failures), :func:`confirmation` for the best plans on fresh
seeds; :func:`summary` shuts Ray down, cleans up and ranks. :func:`~smskd_search.search.runner.run_search`
calls them.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import optuna
from optuna.trial import TrialState

from smskd_search.errors import UserError
from smskd_search.search import confirm as cf
from smskd_search.search import lifecycle as lc
from smskd_search.search import storage as st
from smskd_search.search.cluster import TrialResources, check_address, check_nodes_reach, check_storage, start_ray
from smskd_search.search.confirm import ConfirmSettings
from smskd_search.search.leaderboard import LeaderboardRow, leaderboard, rank_by_single_seed, write_best_plan
from smskd_search.search.mps import MpsDaemon, daemon_folder, mps_blocker, start_mps
from smskd_search.search.progress import ProgressInfo
from smskd_search.search.record import TrialRecord, records
from smskd_search.search.teacher_task import ensure_teacher_on_cluster
from smskd_search.search.tune_run import TuneRound, TuneSettings, run_tune
from smskd_search.search_settings import SearchSettings
from smskd_search.space import LoadedSpace

if TYPE_CHECKING:
    from smskd_search.engine.teacher import TeacherJob, TeacherRecord
    from smskd_search.search.lifecycle import StudySession


@dataclass
class SearchSummary:
    """What :func:`run_search` returns: the study's counts, the ranked completed plans, the best plan file."""

    study: str
    db_path: Path
    storage_url: str
    counts: dict[str, int]  # by Optuna state; FAIL includes the interrupted ones
    n_interrupted: int  # FAIL trials the search cut short (not the plan's fault; a resume re-runs them)
    elapsed_s: float
    interrupted: bool
    # "budget", "exhausted" (the sampler proposed only finished plans), "timeout", "interrupted" or
    # "infrastructure" (short after its retries)
    stop_reason: str
    budget: int
    done: int
    top: list[LeaderboardRow]
    best_plan_path: Path | None
    multi_objective: bool = False
    resources_per_trial: dict[str, float] = field(default_factory=dict)
    max_concurrent: int | None = None
    notes: list[str] = field(default_factory=list)
    confirm: ConfirmSettings | None = None  # None: no confirmation (off, or not reached)
    n_confirmation_runs: int = 0  # COMPLETE confirmation runs in the study
    n_repeats: int = 0  # trials answered from the study (their plan had finished already): off the budget
    # Epochs the study's trials trained, and took from the stage-prefix cache (confirmation runs included).
    epochs_trained: int = 0
    epochs_reused: int = 0
    cache: bool = True  # whether the stage-prefix cache was on
    # Trained epochs whose teacher logits the trials read from the teacher-logit store, and the
    # seconds they waited for another trial computing one (confirmation runs included).
    teacher_epochs_served: float = 0.0
    teacher_wait_s: float = 0.0
    # Training images a second over this run's trials (first start to last end), per GPU where the
    # trials had GPUs; None where no trial of this run trained. ``throughput_on``: "per GPU (1 GPU)",
    # "on 2 CPUs".
    images_per_s: float | None = None
    throughput_on: str = ""
    # Set when every budget trial that finished failed (none completed or was pruned): the first
    # failure, "#<number>: <fail_reason>". The CLI then exits non-zero with it.
    all_failed: str | None = None
    # FAIL trials the infrastructure failed (storage, memory, a lost worker): retried, off the budget.
    n_infrastructure: int = 0

    @property
    def best(self) -> LeaderboardRow | None:
        return self.top[0] if self.top else None


@dataclass(frozen=True)
class SearchHooks:
    """What a search calls as it goes (see :func:`~smskd_search.search.runner.run_search`)."""

    on_progress: Callable[[ProgressInfo], None] | None = None
    on_teacher_epoch: Callable[[int, int, float, float], None] | None = None
    on_teacher_start: Callable[[TeacherJob], None] | None = None
    # Called with the teacher's record once it is ensured, before any trial (its val top-1 in it).
    on_teacher_ready: Callable[[TeacherRecord], None] | None = None


@dataclass
class RayHandle:
    """Ray for one search: started at most once, for the budget and the confirmation runs.

    With ``mps`` (``--mps``), an MPS daemon of the search's own starts before Ray and stops after it
    where packed trials share a GPU (:mod:`~smskd_search.search.mps`); ``mps_note`` says what came
    of it.
    """

    address: str | None
    storage_root: str | None
    started: bool = False
    mps: bool = False
    gpus_per_trial: float = 1.0
    mps_folder: Path | None = None  # the daemon's pipe and log folders' parent (mps.daemon_folder)
    mps_note: str | None = None
    _daemon: MpsDaemon | None = field(default=None, init=False, repr=False)

    def ensure(self) -> None:
        if self.started:
            return
        env = self._start_mps()
        self.started = start_ray(self.address, self.storage_root, env)
        if env and not self.started:  # Ray ran already in this process: its workers are not the daemon's
            self._stop_mps()
            self.mps_note = "--mps: no MPS daemon used: Ray was already running in this process"

    def _start_mps(self) -> dict[str, str]:
        if not self.mps or self.mps_note is not None:
            return self._daemon.env if self._daemon is not None else {}
        from smskd_search.engine.device import cuda_available  # (torch: imported once Ray is wanted)

        why = mps_blocker(cuda=cuda_available(), gpus_per_trial=self.gpus_per_trial, address=self.address,
                          environ=os.environ)
        if why is None:
            got = start_mps(self.mps_folder or Path(tempfile.mkdtemp(prefix="smskd-mps-")))
        else:
            got = why
        if isinstance(got, str):
            self.mps_note = f"--mps: no MPS daemon started: {got}"
            return {}
        self._daemon = got
        self.mps_note = f"--mps: the packed trials ran under an MPS daemon of this search ({got.folder})"
        return got.env

    def _stop_mps(self) -> None:
        if self._daemon is not None:
            self._daemon.stop()
            shutil.rmtree(self._daemon.folder, ignore_errors=True)
            self._daemon = None

    def shutdown(self) -> None:
        try:
            if self.started:
                from smskd_search.search._ray import ray

                ray.shutdown()
                self.started = False
        finally:
            self._stop_mps()  # after Ray: its workers were the daemon's clients


@dataclass(frozen=True)
class SearchRun:
    """A prepared search: its space and settings, where it writes, its Ray, its start time.

    Args:
        space: The space searched.
        settings: The search's settings.
        hooks: The caller's callbacks.
        name: The study name.
        path: The study file.
        storage_root: ``--storage`` as checked (absolute folder or URI); None: the studies folder.
        ray: Ray for the search.
        start: ``time.monotonic()`` when the search started.
    """

    space: LoadedSpace
    settings: SearchSettings
    hooks: SearchHooks
    name: str
    path: Path
    storage_root: str | None
    ray: RayHandle
    start: float


@contextmanager
def prepare(space: LoadedSpace, settings: SearchSettings, hooks: SearchHooks, start: float) -> Iterator[SearchRun]:
    """Check what can be checked before anything is written, then hold the study's lock for the search.

    On a cluster, Ray starts here and every node must reach the storage. Optuna's own log lines are
    off while the search runs (the progress line and the summary say it all); Ray stops at the end.
    """
    if space.space.search is None:
        raise UserError(f"{space.path}: the space has no 'search' part: nothing to search over")
    # Before the study file exists: an unreachable cluster leaves nothing behind, and says so at once.
    check_address(settings.address)
    name = st.check_study_name(settings.study or st.study_name_from(space.space.name))
    path = st.db_path(settings.studies_dir, name)
    if not settings.resume:
        st.check_name_free(settings.studies_dir, name)
    if settings.resume and not st.is_optuna_db(path):
        raise UserError(f"--resume: no study {name} to resume ({path} not found)")
    storage_root = check_storage(settings.storage)
    if settings.resume:
        lc.check_resume_storage(settings.studies_dir, name, storage_root or settings.studies_dir)
    runtime = space.space.runtime
    ray = RayHandle(settings.address, storage_root, mps=settings.mps,
                    gpus_per_trial=settings.gpus_per_trial if settings.gpus_per_trial is not None else
                    runtime.gpus_per_trial, mps_folder=daemon_folder(settings.studies_dir, name))
    try:
        if settings.address is not None:
            # On a cluster, before anything is written: every node must reach what trials write.
            ray.ensure()
            check_nodes_reach(storage_root or str(settings.studies_dir.absolute()), given=storage_root is not None)
        settings.studies_dir.mkdir(parents=True, exist_ok=True)
        lock = st.StudyLock(settings.studies_dir, name).acquire()
    except BaseException:
        ray.shutdown()
        raise
    verbosity = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        yield SearchRun(space, settings, hooks, name, path, storage_root, ray, start)
    finally:
        ray.shutdown()
        optuna.logging.set_verbosity(verbosity)
        lock.release()


def teacher(run: SearchRun) -> TuneSettings:
    """Create (or open) the study file, then ensure its teacher; what every Tune run of the search shares.

    The study file comes first, so that the dashboard can open it while the teacher trains; a new
    study that fails here is removed (its name stays free).
    """
    s = run.settings
    session = lc.open_session(run.space, s.studies_dir, run.name, resume=s.resume, seed=s.seed, budget=s.budget,
                              storage_root=run.storage_root)
    lc.bind_storage_root(session)
    try:
        record = _ensure_teacher(run, session)
    except BaseException:
        if not s.resume:
            lc.discard_if_empty(session)
        raise
    if run.hooks.on_teacher_ready is not None:
        run.hooks.on_teacher_ready(record)
    st.bind_teacher(session.study, teacher_path=record.path, teacher_sha256=record.sha256)
    if s.resume:
        lc.fail_orphans(session)
    return TuneSettings(s, run.space.space, session, record, start=run.start, on_progress=run.hooks.on_progress)


def _ensure_teacher(run: SearchRun, session: StudySession) -> TeacherRecord:
    from smskd_search.engine import ensure_teacher, pick_device
    from smskd_search.engine.device import cuda_available

    s, problem, hooks = run.settings, run.space.space.problem, run.hooks
    if s.address is not None or cuda_available():
        # On a cluster: where the cluster has the resources for it, not on the driver. On a
        # GPU machine too: Ray starts while the teacher trains, and the task's worker exits
        # after it, so no process holds the teacher's GPU memory while the trials run.
        run.ray.ensure()
        record, node = ensure_teacher_on_cluster(problem, s.studies_dir / "teachers", on_epoch=hooks.on_teacher_epoch,
                                                 on_start=hooks.on_teacher_start, deterministic=s.deterministic,
                                                 cuda_graphs=s.cuda_graphs)
        if node is not None and s.address is not None:
            session.notes.append(f"the teacher trained as a Ray task on node {node}")
        return record
    return ensure_teacher(problem, cache_root=s.studies_dir / "teachers", device=pick_device(None),
                          on_epoch=hooks.on_teacher_epoch, on_start=hooks.on_teacher_start,
                          deterministic=s.deterministic, cuda_graphs=s.cuda_graphs)


@dataclass
class BudgetOutcome:
    """How the budget's Tune runs ended."""

    exhausted: bool = False  # the sampler proposed only finished plans
    interrupted: bool = False  # a second Ctrl-C reached us while Tune was winding down
    resources: TrialResources | None = None  # the last run's


def budget(run: SearchRun, tune: TuneSettings) -> BudgetOutcome:
    """Run the trials the budget still lacks (retries and baselines first).

    While new infrastructure failures left it short (they do not count toward it), another round
    for their retries and the trials still owed, at most ``INFRA_ATTEMPTS`` in all.
    """
    s, session = run.settings, tune.session
    before = session.trials()
    remaining = s.budget - lc.budget_done(before)
    if remaining > 0:
        lc.enqueue_retries(session)
        if s.baselines:
            lc.enqueue_baselines(session, run.space, tune.teacher.sha256, remaining)
    lc.clean_run_dirs(session)

    def timed_out() -> bool:
        return tune.deadline is not None and time.monotonic() > tune.deadline

    out = BudgetOutcome()
    n_infra, rounds = _n_infra(before), 0
    # The confirmation runs start in the budget's workers, as soon as the budget's last trials can no
    # longer change which plans they confirm; confirmation() runs what that left undone.
    confirm = s.confirm if s.confirm is not None and s.confirm.enabled and not _multi(run) else None
    while remaining > 0 and not out.interrupted and not timed_out():
        run.ray.ensure()
        outcome = run_tune(tune, TuneRound(trials=remaining, budget=s.budget, before=before, seed=s.seed + len(before),
                                           prune=s.prune, confirm=confirm))
        rounds += 1
        session.notes += outcome.notes
        out.interrupted, out.exhausted = outcome.interrupted, outcome.exhausted
        out.resources = outcome.resources or out.resources
        before = session.trials()
        remaining = s.budget - lc.budget_done(before)
        if out.exhausted:
            session.notes.append(
                f"the sampler proposed only finished plans {lc.MAX_REPEATS_IN_A_ROW} times in a row: stopped with "
                f"{lc.budget_done(before)} of the {s.budget} budget trials (the space, or the region the sampler "
                f"settled on, has no new plan)")
        if out.exhausted or out.interrupted or timed_out() or rounds >= lc.INFRA_ATTEMPTS \
                or _n_infra(before) == n_infra:
            break
        n_infra = _n_infra(before)
        lc.enqueue_retries(session, infrastructure_only=True)
    return out


@dataclass(frozen=True)
class ConfirmOutcome:
    """How the confirmation ended."""

    settings: ConfirmSettings | None = None  # None: no confirmation (off, or not reached)
    interrupted: bool = False
    resources: TrialResources | None = None  # its Tune run's (None: none ran)


def confirmation(run: SearchRun, tune: TuneSettings, spent: BudgetOutcome) -> ConfirmOutcome:
    """Re-run the best distinct plans and baselines on fresh seeds, once the budget is met.

    Most runs, usually all, ran already in the budget's last Tune run; this enqueues only the runs the
    study lacks (those of a plan a retried trial could still have displaced there; what a stop left
    undone, on resume) and runs them in a Tune run of their own.
    """
    confirm, session = run.settings.confirm, tune.session
    if confirm is None or not confirm.enabled or spent.interrupted \
            or not (spent.exhausted or lc.budget_done(session.trials()) >= run.settings.budget):
        return ConfirmOutcome()
    if _multi(run):
        session.notes.append("no confirmation runs in an accuracy-vs-cost (multi-objective) search")
        return ConfirmOutcome()
    waiting = cf.enqueue(session, rank_by_single_seed(session.trials()), tune.space.seed, confirm)
    if not waiting:
        return ConfirmOutcome(confirm)
    run.ray.ensure()
    outcome = run_tune(tune, TuneRound(trials=waiting, budget=waiting, before=[], seed=run.settings.seed, prune=False,
                                       phase="confirm"))
    session.notes += outcome.notes
    return ConfirmOutcome(confirm, outcome.interrupted, outcome.resources)


def summary(run: SearchRun, tune: TuneSettings, spent: BudgetOutcome, confirmed: ConfirmOutcome) -> SearchSummary:
    """Stop Ray, clean up the trial folders, rank, write the best plan and close the study."""
    # At once, as before any clean-up: a trial Tune stopped at a Ctrl-C may still be running
    # in its worker, and must not go on writing (or removing) its stage checkpoints.
    run.ray.shutdown()
    s, session, name = run.settings, tune.session, run.name
    if run.ray.mps_note is not None:
        session.notes.append(run.ray.mps_note)
    lc.clean_run_dirs(session)
    elapsed = time.monotonic() - run.start
    trials = session.trials()
    done = lc.budget_done(trials)
    reason = _stop_reason(s, done, elapsed, spent.exhausted, spent.interrupted or confirmed.interrupted, trials)
    multi = _multi(run)
    top = leaderboard(session.study, trials, multi)
    best_path = None
    if top:
        best_trial = next(t for t in trials if t.number == top[0].number)
        best_path = write_best_plan(best_trial, s.studies_dir / name / "best.yaml", name, run.space, top[0].confirmed)
    recs = records(trials)
    n_confirm = sum(1 for r in recs if r.is_confirmation and r.state == TrialState.COMPLETE)
    if confirmed.settings is not None:
        left = cf.missing(trials, rank_by_single_seed(trials), tune.space.seed, confirmed.settings)
        if left:
            session.notes.append(f"confirmation incomplete: {left} run(s) missing; --resume --study {name} runs them")
    lc.close(session)
    resources = confirmed.resources or spent.resources
    return SearchSummary(
        study=name, db_path=run.path, storage_url=st.storage_url(run.path), counts=st.counts_by_state(trials),
        n_interrupted=sum(1 for r in recs if r.state == TrialState.FAIL and r.interrupted),
        elapsed_s=elapsed, interrupted=done < s.budget and not spent.exhausted, stop_reason=reason, budget=s.budget,
        done=done, top=top, best_plan_path=best_path, multi_objective=multi, notes=session.notes,
        resources_per_trial=resources.per_trial if resources is not None else {},
        max_concurrent=resources.concurrent if resources is not None else None, confirm=confirmed.settings,
        n_confirmation_runs=n_confirm,
        n_repeats=sum(1 for r in recs if r.is_repeat),
        all_failed=_all_failed(trials),
        n_infrastructure=_n_infra(trials),
        epochs_trained=sum(r.attrs.epochs_trained or 0 for r in recs),
        epochs_reused=sum(r.attrs.epochs_reused or 0 for r in recs),
        cache=s.cache,
        teacher_epochs_served=sum(r.attrs.teacher_epochs_served or 0.0 for r in recs),
        teacher_wait_s=sum(r.attrs.teacher_wait_s or 0.0 for r in recs),
        **_throughput(recs, time.time() - (time.monotonic() - run.start), resources),
    )


def _throughput(recs: list[TrialRecord], since: float, resources: TrialResources | None) -> dict:
    """``images_per_s`` and ``throughput_on`` of the trials that started after ``since`` (Unix time):
    the images they trained over the span from the first one's start to the last one's end, on the
    devices the trials held at once."""
    spans = [(r.attrs.trial_started_at, r.attrs.trial_started_at + r.attrs.trial_seconds, r.attrs.images_trained or 0)
             for r in recs if r.attrs.trial_started_at is not None and r.attrs.trial_started_at >= since
             and r.attrs.trial_seconds is not None]
    images = sum(n for _, _, n in spans)
    if not images or resources is None:
        return {}
    span = max(end for _, end, _ in spans) - min(start for start, _, _ in spans)
    if span <= 0:
        return {}
    gpus = resources.per_trial.get("gpu", 0.0) * resources.concurrent
    if gpus > 0:
        n = max(1, round(gpus))
        return {"images_per_s": images / span / n, "throughput_on": f"per GPU ({n} GPU{'s' if n > 1 else ''})"}
    cpus = int(resources.per_trial.get("cpu", 1.0) * resources.concurrent)
    return {"images_per_s": images / span, "throughput_on": f"on {cpus} CPU{'s' if cpus > 1 else ''}"}


def _multi(run: SearchRun) -> bool:
    search = run.space.space.search
    return search is not None and bool(search.objective.cost_objective)


def _stop_reason(s: SearchSettings, done: int, elapsed: float, exhausted: bool, interrupted: bool,
                 trials: list[optuna.trial.FrozenTrial]) -> str:
    if done >= s.budget:
        return "budget"
    if exhausted:
        return "exhausted"
    if s.timeout is not None and not interrupted and elapsed >= s.timeout:
        return "timeout"
    if not interrupted and _n_infra(trials):
        return "infrastructure"  # retried INFRA_ATTEMPTS rounds and still short: the machine, not the plans
    return "interrupted"


def _n_infra(trials: list[optuna.trial.FrozenTrial]) -> int:
    return sum(1 for r in records(trials) if r.state == TrialState.FAIL and r.infrastructure)


def _all_failed(trials: list[optuna.trial.FrozenTrial]) -> str | None:
    """The first failure, where no budget trial finished other than by failing (see SearchSummary)."""
    budget = [r for r in records(trials) if r.counts_toward_budget]
    if not budget or any(t.state != TrialState.FAIL for t in budget):
        return None
    first = min(budget, key=lambda t: t.number)
    return f"#{first.number}: {first.attrs.fail_reason or 'no reason recorded'}"


__all__ = ["BudgetOutcome", "ConfirmOutcome", "RayHandle", "SearchHooks", "SearchRun", "SearchSummary", "budget",
           "confirmation", "prepare", "summary", "teacher"]
