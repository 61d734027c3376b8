"""``run_search``: a study of SMSKD plans, Ray Tune trials sampled by Optuna, pruned by stage.

Order of work: check every setting, create (or check, on resume) the study database, ensure the
teacher, and only then start Ray, so that the dashboard can open the study and every trial finds
a trained teacher. The parts: :mod:`~smskd_search.search.lifecycle` (the study around a run),
:mod:`~smskd_search.search.tune_run` (one Tune run), :mod:`~smskd_search.search.leaderboard`.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import optuna
from optuna.trial import TrialState

from smskd_search.engine.prefix_cache import DEFAULT_MAX_BYTES
from smskd_search.errors import UserError
from smskd_search.search import confirm as cf
from smskd_search.search import lifecycle as lc
from smskd_search.search import storage as st
from smskd_search.search import storage_fs as sfs
from smskd_search.search.cluster import check_address, check_nodes_reach, check_storage, start_ray
from smskd_search.search.confirm import ConfirmSettings
from smskd_search.search.leaderboard import LeaderboardRow, leaderboard, rank_by_single_seed, write_best_plan
from smskd_search.search.progress import ProgressInfo
from smskd_search.search.teacher_task import ensure_teacher_on_cluster
from smskd_search.search.tune_run import TuneSettings, run_tune
from smskd_search.search_flags import check_search_flags
from smskd_search.space import LoadedSpace

if TYPE_CHECKING:
    from smskd_search.engine.teacher import TeacherJob

DEFAULT_CONFIRM = ConfirmSettings()


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
    # Set when every budget trial that finished failed (none completed or was pruned): the first
    # failure, "#<number>: <fail_reason>". The CLI then exits non-zero with it.
    all_failed: str | None = None
    # FAIL trials the infrastructure failed (storage, memory, a lost worker): retried, off the budget.
    n_infrastructure: int = 0

    @property
    def best(self) -> LeaderboardRow | None:
        return self.top[0] if self.top else None


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
    confirm: ConfirmSettings | None = DEFAULT_CONFIRM,
    deterministic: bool = False,
    cache: bool = True,
    cache_max_bytes: int = DEFAULT_MAX_BYTES,
    storage: str | Path | None = None,
    on_progress: Callable[[ProgressInfo], None] | None = None,
    on_teacher_epoch: Callable[[int, int, float, float], None] | None = None,
    on_teacher_start: Callable[[TeacherJob], None] | None = None,
) -> SearchSummary:
    """Search a space's plans on Ray Tune, sampled by Optuna, into ``studies_dir/<study>.db``.

    Args:
        space: The space (:func:`smskd_search.load_space`).
        budget: The study's total number of finished trials (earlier runs included on resume;
            trials the search itself cut short do not count and are run again).
        study: The study name (default: from the space's name).
        studies_dir: Where studies, teachers and trial folders live.
        max_concurrent: Trials at once (default: as many as the cluster's resources fit).
        cpus_per_trial: CPUs per trial (default: the space's ``runtime``).
        gpus_per_trial: GPUs per trial, fractional to pack trials (default: the space's ``runtime``).
        address: A Ray cluster to join (default: start local Ray).
        seed: The sampler's seed.
        timeout: Seconds for the whole search, teacher included; then no new trial starts.
        resume: Continue the existing study to its budget (also after the process was killed).
        prune: Apply the space's pruning.
        baselines: Enqueue the baselines first (each method alone, a sequence without reference).
        confirm: After the budget, re-run the best distinct plans and baselines on fresh seeds
            (:class:`ConfirmSettings`); None: no confirmation. The ranking uses the confirmed means.
        deterministic: The same space and ``seed`` give the same study on CPU (same trials, same
            values): trials run one at a time, so the sampler is asked and told, and the rungs
            filled, in trial-number order. Costs the parallelism (about 2x the wall time on 2 cores).
            On a GPU, the teacher and the trials also run PyTorch's deterministic algorithms
            (:func:`~smskd_search.engine.device.set_numerics`); without it GPU values are close,
            not bit-for-bit, from run to run.
        cache: Keep every finished stage in ``studies_dir/cache/stages`` (shared by the studies
            there: its key says everything that determines a stage) and start each trial from the
            longest prefix of its stages found there; the frozen teacher's outputs are kept in
            ``studies_dir/cache/teacher_outputs``, and with augmentation the teacher's logits of
            each epoch's batches in ``studies_dir/cache/teacher_logits`` (KD, DKD and CE epochs
            read them instead of running the teacher). The values are the same as without it (on CPU).
        cache_max_bytes: The size cap of each of the three cache folders (least recently used first).
        storage: A folder for everything trials write (stage checkpoints, Tune's files, the stage
            cache), which every node of a cluster must mount at the same path, or an ``s3://`` URI
            (pyarrow's form, :mod:`~smskd_search.search.storage_fs`); default ``studies_dir``. The
            study file stays in ``studies_dir`` (only the driver writes it). Joining a cluster of
            several nodes without it is refused before anything is written.
        on_progress: Called with a :class:`ProgressInfo` whenever the counts change.
        on_teacher_epoch: Called (epoch, epochs, loss, val_acc) while the teacher trains.
        on_teacher_start: Called with a :class:`~smskd_search.engine.teacher.TeacherJob` (what,
            how long, on which device) before a teacher is trained; not on a cache hit.

    Returns:
        The study's :class:`SearchSummary`. Ctrl-C stops cleanly: finished trials stay, and the
        summary says ``interrupted``.

    Example:

        >>> from smskd_search import load_space, run_search
        >>> summary = run_search(load_space("default"), budget=4, study="demo")  # doctest: +SKIP
        >>> summary.best.sequence  # doctest: +SKIP
        'dkd(8)'
    """
    start = time.monotonic()
    sp = space.space
    if sp.search is None:
        raise UserError(f"{space.path}: the space has no 'search' part: nothing to search over")
    search = sp.search
    check_search_flags(budget=budget, timeout=timeout, cpus_per_trial=cpus_per_trial, gpus_per_trial=gpus_per_trial,
                       max_concurrent=max_concurrent, cache=cache, cache_max_bytes=cache_max_bytes,
                       deterministic=deterministic,
                       confirm=None if confirm is None else (confirm.plans, confirm.baselines, confirm.seeds))
    if deterministic:
        max_concurrent = 1
    # Before the study file exists: an unreachable cluster leaves nothing behind, and says so at once.
    check_address(address)
    name = st.check_study_name(study or st.study_name_from(sp.name))
    studies_dir = Path(studies_dir)
    path = st.db_path(studies_dir, name)
    if not resume:
        st.check_name_free(studies_dir, name)
    if resume and not st.is_optuna_db(path):
        raise UserError(f"--resume: no study {name} to resume ({path} not found)")
    storage_root = check_storage(storage)
    if resume:
        lc.check_resume_storage(studies_dir, name, storage_root or studies_dir)
    ray_started = False  # Ray starts once for the budget and the confirmation runs
    try:
        if address is not None:
            # On a cluster, before anything is written: every node must reach what trials write.
            ray_started = start_ray(address, storage_root)
            check_nodes_reach(storage_root or str(studies_dir.absolute()), given=storage_root is not None)
        studies_dir.mkdir(parents=True, exist_ok=True)
        lock = st.StudyLock(studies_dir, name).acquire()
    except BaseException:
        if ray_started:
            _shutdown_ray()
        raise
    optuna_verbosity = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # the progress line and summary say it all
    try:
        from smskd_search.engine import ensure_teacher, pick_device
        from smskd_search.engine.device import cuda_available

        # The study file first, so that the dashboard can open it while the teacher trains.
        session = lc.open_session(space, studies_dir, name, resume=resume, seed=seed, budget=budget,
                                  storage_root=storage_root)
        lc.bind_storage_root(session)
        try:
            if address is not None or cuda_available():
                # On a cluster: where the cluster has the resources for it, not on the driver. On a
                # GPU machine too: Ray starts while the teacher trains, and the task's worker exits
                # after it, so no process holds the teacher's GPU memory while the trials run.
                ray_started = ray_started or start_ray(address, storage_root)
                teacher, node = ensure_teacher_on_cluster(sp.problem, studies_dir / "teachers", on_epoch=on_teacher_epoch,
                                                          on_start=on_teacher_start, deterministic=deterministic)
                if node is not None and address is not None:
                    session.notes.append(f"the teacher trained as a Ray task on node {node}")
            else:
                teacher = ensure_teacher(sp.problem, cache_root=studies_dir / "teachers", device=pick_device(None),
                                         on_epoch=on_teacher_epoch, on_start=on_teacher_start,
                                         deterministic=deterministic)
        except BaseException:
            if not resume:
                lc.discard_if_empty(session)
            raise
        st.bind_teacher(session.study, teacher_path=teacher.path, teacher_sha256=teacher.sha256)
        if resume:
            lc.fail_orphans(session)
        before = session.trials()
        remaining = budget - lc.budget_done(before)
        if remaining > 0:
            lc.enqueue_retries(session)
            if baselines:
                lc.enqueue_baselines(session, space, teacher.sha256, remaining)
        lc.clean_run_dirs(session)

        resources: dict[str, float] = {}
        concurrent = None
        interrupted_by_signal = False
        common: dict[str, Any] = dict(
            space=sp, session=session, teacher=teacher, cpus_per_trial=cpus_per_trial, gpus_per_trial=gpus_per_trial,
            max_concurrent=max_concurrent, address=address, deadline=start + timeout if timeout is not None else None,
            start=start, on_progress=on_progress, cache_dir=sfs.join(session.storage_root, "cache") if cache else None,
            cache_max_bytes=cache_max_bytes, deterministic=deterministic)
        # The budget; then, while new infrastructure failures left it short (they do not count toward
        # it), another round for their retries and the trials still owed, at most INFRA_ATTEMPTS in all.
        def timed_out() -> bool:
            return timeout is not None and time.monotonic() > start + timeout

        n_infra, rounds = _n_infra(before), 0
        exhausted = False
        while remaining > 0 and not interrupted_by_signal and not timed_out():
            ray_started = ray_started or start_ray(address, storage_root)
            outcome = run_tune(TuneSettings(**common, trials=remaining, budget=budget, before=before,
                                            seed=seed + len(before), prune=prune))
            rounds += 1
            session.notes += outcome.notes
            interrupted_by_signal = outcome.interrupted
            exhausted = outcome.exhausted
            if outcome.resources is not None:
                resources, concurrent = outcome.resources.per_trial, outcome.resources.concurrent
            before = session.trials()
            remaining = budget - lc.budget_done(before)
            if exhausted:
                session.notes.append(
                    f"the sampler proposed only finished plans {lc.MAX_REPEATS_IN_A_ROW} times in a row: stopped with "
                    f"{lc.budget_done(before)} of the {budget} budget trials (the space, or the region the sampler "
                    f"settled on, has no new plan)")
            if exhausted or interrupted_by_signal or timed_out() or rounds >= lc.INFRA_ATTEMPTS \
                    or _n_infra(before) == n_infra:
                break
            n_infra = _n_infra(before)
            lc.enqueue_retries(session, infrastructure_only=True)
        multi = bool(search.objective.cost_objective)
        confirmed_with: ConfirmSettings | None = None
        if confirm is not None and confirm.enabled and not interrupted_by_signal \
                and (exhausted or lc.budget_done(session.trials()) >= budget):
            if multi:
                session.notes.append("no confirmation runs in an accuracy-vs-cost (multi-objective) search")
            else:
                confirmed_with = confirm
                waiting = cf.enqueue(session, rank_by_single_seed(session.trials()), sp.seed, confirm)
                if waiting:
                    ray_started = ray_started or start_ray(address, storage_root)
                    outcome = run_tune(TuneSettings(**common, trials=waiting, budget=waiting, before=[], seed=seed,
                                                    prune=False, phase="confirm"))
                    session.notes += outcome.notes
                    interrupted_by_signal = outcome.interrupted
                    if outcome.resources is not None:
                        resources, concurrent = outcome.resources.per_trial, outcome.resources.concurrent
        if ray_started:
            # At once, as before any clean-up: a trial Tune stopped at a Ctrl-C may still be running
            # in its worker, and must not go on writing (or removing) its stage checkpoints.
            _shutdown_ray()
            ray_started = False
        lc.clean_run_dirs(session)
        elapsed = time.monotonic() - start
        trials = session.trials()
        done = lc.budget_done(trials)
        if done >= budget:
            reason = "budget"
        elif exhausted:
            reason = "exhausted"
        elif timeout is not None and not interrupted_by_signal and elapsed >= timeout:
            reason = "timeout"
        elif not interrupted_by_signal and _n_infra(trials):
            reason = "infrastructure"  # retried INFRA_ATTEMPTS rounds and still short: the machine, not the plans
        else:
            reason = "interrupted"
        top = leaderboard(session.study, trials, multi)
        best_path = None
        if top:
            best_trial = next(t for t in trials if t.number == top[0].number)
            best_path = write_best_plan(best_trial, studies_dir / name / "best.yaml", name, space, top[0].confirmed)
        n_confirm = sum(1 for t in trials if cf.is_confirmation(t) and t.state == TrialState.COMPLETE)
        if confirmed_with is not None:
            left = cf.missing(trials, rank_by_single_seed(trials), sp.seed, confirmed_with)
            if left:
                session.notes.append(f"confirmation incomplete: {left} run(s) missing; --resume --study {name} runs them")
        lc.close(session)
        return SearchSummary(
            study=name, db_path=path, storage_url=st.storage_url(path), counts=st.counts_by_state(trials),
            n_interrupted=sum(1 for t in trials if t.state == TrialState.FAIL and t.user_attrs.get(st.ATTR_INTERRUPTED)),
            elapsed_s=elapsed, interrupted=done < budget and not exhausted, stop_reason=reason, budget=budget, done=done,
            top=top, best_plan_path=best_path, multi_objective=multi, notes=session.notes,
            resources_per_trial=resources, max_concurrent=concurrent, confirm=confirmed_with,
            n_confirmation_runs=n_confirm,
            n_repeats=sum(1 for t in trials if st.is_repeat(t)),
            all_failed=_all_failed(trials),
            n_infrastructure=_n_infra(trials),
            epochs_trained=sum(int(t.user_attrs.get(st.ATTR_EPOCHS_TRAINED) or 0) for t in trials),
            epochs_reused=sum(int(t.user_attrs.get(st.ATTR_EPOCHS_REUSED) or 0) for t in trials),
            cache=cache,
        )
    finally:
        if ray_started:
            _shutdown_ray()
        optuna.logging.set_verbosity(optuna_verbosity)
        lock.release()


def _n_infra(trials: list[optuna.trial.FrozenTrial]) -> int:
    return sum(1 for t in trials if t.state == TrialState.FAIL and t.user_attrs.get(st.ATTR_INFRA))


def _all_failed(trials: list[optuna.trial.FrozenTrial]) -> str | None:
    """The first failure, where no budget trial finished other than by failing (see SearchSummary)."""
    budget = [t for t in trials if st.counts_toward_budget(t)]
    if not budget or any(t.state != TrialState.FAIL for t in budget):
        return None
    first = min(budget, key=lambda t: t.number)
    return f"#{first.number}: {first.user_attrs.get(st.ATTR_FAIL_REASON) or 'no reason recorded'}"


def _shutdown_ray() -> None:
    from smskd_search.search._ray import ray

    ray.shutdown()


__all__ = ["SearchSummary", "run_search"]
