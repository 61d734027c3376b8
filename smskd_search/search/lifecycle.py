"""A study's lifecycle around a search run: create or resume, orphans, retries, baselines, cleanup.

A resume continues a study to its budget from the database alone, never from a Tune snapshot:
after a hard kill the snapshot is older than the database. Trials the previous process left
RUNNING are marked FAIL (``interrupted``) and their plans enqueued again; each rerun continues from
the last stage checkpoint of the interrupted one.
"""

from __future__ import annotations

import sqlite3
from dataclasses import dataclass, field
from pathlib import Path

import optuna
from optuna.storages import RDBStorage
from optuna.trial import FrozenTrial, TrialState

from smskd_search.errors import UserError
from smskd_search.search import run_dirs
from smskd_search.search import storage as st
from smskd_search.search import storage_fs as sfs
from smskd_search.search.record import StudyAttrs, TrialAttrs, TrialRecord, records, write_study_attrs
from smskd_search.search.sampling import baseline_plans
from smskd_search.space import LoadedSpace


@dataclass
class StudySession:
    """An open study of this process (which holds its lock).

    Args:
        name: The study name (the file stem of ``path``).
        path: The study file.
        study: The Optuna study.
        storage: The storage ``study`` was opened on (for writes to trials by number).
        runs_dir: Where the trials' stage checkpoints live while they run (a folder or a URI).
        storage_root: The folder or URI everything trials write lives under (``--storage``; the
            studies folder by default): ``<root>/<study>/trials``, ``<root>/<study>/ray``,
            ``<root>/cache`` (see :func:`storage_text`).
        notes: What the lifecycle did, in words, for the summary.
    """

    name: str
    path: Path
    study: optuna.Study
    storage: RDBStorage
    runs_dir: str
    storage_root: str
    notes: list[str] = field(default_factory=list)

    def trials(self) -> list[FrozenTrial]:
        return self.study.get_trials(deepcopy=False)


def storage_text(storage_root: str | Path) -> str:
    """How a study records its storage: a folder resolved to its absolute path, a URI as given.

    Example:

        >>> storage_text("s3://bucket/prefix/")
        's3://bucket/prefix'
    """
    text = str(storage_root)
    if sfs.is_uri(text):
        base, sep, query = text.partition("?")
        return base.rstrip("/") + sep + query
    return str(Path(text).resolve())


def open_session(space: LoadedSpace, studies_dir: Path, name: str, *, resume: bool, seed: int,
                 budget: int, storage_root: str | Path | None = None) -> StudySession:
    """Create the study (or load it for a resume, checked against the space); trials write under
    ``storage_root`` (default: ``studies_dir``)."""
    path = st.db_path(studies_dir, name)
    # Checked before the storage opens: opening creates the file.
    if resume and not st.is_optuna_db(path):
        raise UserError(f"--resume: no study {name} to resume ({path} not found)")
    if not resume:
        st.check_name_free(studies_dir, name)
    path.parent.mkdir(parents=True, exist_ok=True)
    storage = st.open_storage(path)
    if resume:
        study = st.load_study_for_resume(space, studies_dir, name, budget=budget, storage=storage)
    else:
        study = st.create_study(space, studies_dir, name, seed=seed, budget=budget, storage=storage)
    root = storage_text(storage_root or studies_dir)
    return StudySession(name, path, study, storage, sfs.join(root, name, "trials"), root)


def check_resume_storage(studies_dir: Path, name: str, storage_root: str | Path) -> None:
    """Before a resume writes anything: the study's trials must write where they did (their stage
    checkpoints, Tune's files and the retries' folders are there); read-only, one UserError line."""
    study = optuna.load_study(study_name=name, storage=st.readonly_storage(st.db_path(studies_dir, name)))
    used, here = StudyAttrs.of(study).storage_root, storage_text(storage_root)
    if used is not None and used != here:
        raise UserError(f"--storage: study {name} keeps its trials' files in {used}; resume it with "
                        f"--storage {used} (not {here})")


def bind_storage_root(session: StudySession) -> None:
    """Record where the study's trials write (see :func:`check_resume_storage`)."""
    if StudyAttrs.of(session.study).storage_root is None:
        write_study_attrs(session.study, StudyAttrs(storage_root=session.storage_root))


def close(session: StudySession) -> None:
    """Close the study's connections and fold the write-ahead log back into the file, so that a
    finished study is one file that can be copied (no ``-wal``/``-shm`` beside it).

    A reader still connected (a dashboard) keeps the log; then it stays, as SQLite wants.
    """
    _disconnect(session)
    try:
        con = sqlite3.connect(session.path, timeout=5)
        try:
            con.execute("PRAGMA journal_mode=DELETE")
        finally:
            con.close()
    except sqlite3.Error:
        pass


def _disconnect(session: StudySession) -> None:
    session.storage.remove_session()
    session.storage.engine.dispose()


def discard_if_empty(session: StudySession) -> None:
    """Remove a study file nothing ran in (a failed start), so the name stays free: its connections
    closed first, then the file and the write-ahead log SQLite keeps beside it."""
    if session.trials():
        return
    _disconnect(session)
    for suffix in ("", "-wal", "-shm"):
        session.path.with_name(session.path.name + suffix).unlink(missing_ok=True)


def fail_orphans(session: StudySession) -> None:
    orphans = st.fail_orphans(session.storage, session.study,
                              "interrupted: the search process ended while this trial ran")
    if orphans:
        session.notes.append(f"marked {len(orphans)} trial(s) left running by the previous process FAIL "
                             f"(interrupted): {orphans}")


def budget_done(trials: list[FrozenTrial] | list[TrialRecord]) -> int:
    return sum(1 for t in records(trials) if t.counts_toward_budget)


def _retried(trials: list[TrialRecord]) -> set[int]:
    """Numbers of interrupted trials that have a rerun (in any state)."""
    return {t.attrs.retry_of for t in trials if t.attrs.retry_of is not None}


# Attempts of one plan that failed through the infrastructure (storage, memory, a lost worker): the
# first and two retries; after that the trial stays FAIL, still off the budget.
INFRA_ATTEMPTS = 3

# Finished plans the sampler may propose in a row (each answered from the study, off the budget)
# before a search stops as exhausted: a space with a handful of plans runs dry, and TPE settled on a
# few plans keeps proposing them. Each such ask costs one sampler call and one study write.
MAX_REPEATS_IN_A_ROW = 30


def _to_retry(t: TrialRecord, infra: set[int]) -> bool:
    """``infra``: the numbers of the study's infrastructure failures (a plan's earlier attempts)."""
    if t.state != TrialState.FAIL or t.is_confirmation:
        return False  # (a confirmation run cut short is enqueued again by the confirmation step)
    if t.interrupted:
        return True
    earlier = sum(1 for n in t.attrs.resume_from or () if n in infra)
    return t.infrastructure and 1 + earlier < INFRA_ATTEMPTS


def enqueue_retries(session: StudySession, infrastructure_only: bool = False) -> list[int]:
    """Enqueue the plan of every interrupted trial, and of every infrastructure failure with attempts
    left (:data:`INFRA_ATTEMPTS`), that has no rerun yet; returns their numbers.

    Args:
        session: The study.
        infrastructure_only: Only the infrastructure failures (between rounds of one search, where
            an interrupted trial is one this process stopped on purpose).
    """
    trials = records(session.trials())
    retried = _retried(trials)
    infra = {t.number for t in trials if t.infrastructure}
    out = []
    for t in trials:
        if infrastructure_only and not t.infrastructure:
            continue
        if _to_retry(t, infra) and t.number not in retried:
            attrs = TrialAttrs(baseline=t.attrs.baseline, fixed_plan=t.attrs.fixed_plan, retry_of=t.number,
                               resume_from=(t.number, *(t.attrs.resume_from or ())))
            session.study.enqueue_trial(dict(t.params), user_attrs=attrs.stored())
            out.append(t.number)
    if out:
        session.notes.append(f"re-running interrupted or infrastructure-failed trial(s) {out} "
                             "from their last stage checkpoint")
    return out


def enqueue_baselines(session: StudySession, space: LoadedSpace, teacher_sha256: str, remaining: int) -> None:
    """Enqueue the baselines the study has not run yet, within the trials left in the budget."""
    trials = records(session.trials())
    present = {t.attrs.baseline for t in trials}
    waiting = sum(1 for t in trials if t.state == TrialState.WAITING)
    room = max(0, remaining - waiting)
    for b in baseline_plans(space, teacher_sha256):
        if b.label in present:
            continue
        if room <= 0:
            session.notes.append(f"budget too small for baseline {b.label}")
            continue
        session.study.enqueue_trial(b.params or {}, user_attrs=b.attrs.stored())
        room -= 1


def clean_run_dirs(session: StudySession) -> None:
    """Drop stage checkpoints nobody will resume from (finished trials, rerun interrupted ones)."""
    present = {rel for rel, _, _, is_dir in sfs.listing(session.runs_dir) if is_dir}
    if not present:
        return
    trials = records(session.trials())
    # An interrupted (or infrastructure-failed) trial's checkpoints stay until a rerun of its plan
    # has finished for good.
    settled = {n for t in trials if t.finished_for_good for n in t.attrs.resume_from or ()}
    for t in trials:
        if f"{t.number:05d}" not in present or t.state in (TrialState.RUNNING, TrialState.WAITING):
            continue
        if (t.interrupted or t.infrastructure) and t.number not in settled:
            continue
        run_dirs.drop(sfs.join(session.runs_dir, f"{t.number:05d}"))


__all__ = [
    "StudySession",
    "MAX_REPEATS_IN_A_ROW",
    "budget_done",
    "clean_run_dirs",
    "close",
    "discard_if_empty",
    "enqueue_baselines",
    "enqueue_retries",
    "fail_orphans",
    "open_session",
    "storage_text",
]
