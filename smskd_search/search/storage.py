"""Study storage: one SQLite file per study, ``<studies_dir>/<study>.db``, study name = file stem.

The schema and the study are created before Ray starts, so that ``optuna-dashboard`` can open the
file from the first second (it exits on a file without the schema). Reusing a study name is an
error unless the caller resumes; a resume checks that the space and the teacher are the ones the
study was made with.
"""

from __future__ import annotations

import json
import os
import re
import socket
import sqlite3
import urllib.parse
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import optuna
from optuna.storages import RDBStorage
from optuna.trial import FrozenTrial, TrialState

from smskd_search.errors import UserError
from smskd_search.search.leaderboard import rank_trials

# The stored names live in the record; these stay importable from here for callers not yet
# converted (runner.py, cli.py, benchmarks): the lead drops them once those read the record.
from smskd_search.search.record import (  # noqa: F401
    ATTR_CONFIRM_OF,
    ATTR_CONFIRM_SEED,
    ATTR_DATA_ROOT,
    ATTR_EPOCH_VAL_ACC,
    ATTR_EPOCHS_REUSED,
    ATTR_EPOCHS_TRAINED,
    ATTR_FAIL_REASON,
    ATTR_FAIL_TRACEBACK,
    ATTR_INFRA,
    ATTR_INTERRUPTED,
    ATTR_N_VAL,
    ATTR_NODE,
    ATTR_PLAN,
    ATTR_PLAN_KEY,
    ATTR_PRUNED_REASON,
    ATTR_REPEAT_OF,
    ATTR_REPLAYED_STAGES,
    ATTR_RESUME_FROM,
    ATTR_RETRY_OF,
    ATTR_RUN_DIR,
    ATTR_SEQUENCE,
    ATTR_STAGE_CUM_EPOCHS,
    ATTR_STAGE_REPORTED_AT,
    ATTR_STAGE_VAL_ACC,
    ATTR_STORAGE_ROOT,
    ATTR_THREADS,
    ATTR_TOTAL_EPOCHS,
    ATTR_TRIAL_SECONDS,
    ATTR_TRIAL_STARTED_AT,
    StudyAttrs,
    TrialAttrs,
    TrialRecord,
    confirmations,
    record,
    write_study_attrs,
    write_trial_attrs_by_number,
)
from smskd_search.space import LoadedSpace

_NAME_OK = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


def study_name_from(text: str) -> str:
    """A study name (and file stem) derived from a space name: safe characters only."""
    name = re.sub(r"[^A-Za-z0-9_.-]+", "-", text).strip("-.") or "study"
    return name


def check_study_name(name: str) -> str:
    if not _NAME_OK.match(name):
        raise UserError(f"--study: {name!r} is not a valid study name (letters, digits, '_', '.', '-')")
    return name


def db_path(studies_dir: str | Path, study: str) -> Path:
    return Path(studies_dir) / f"{study}.db"


def storage_url(path: str | Path) -> str:
    return f"sqlite:///{Path(path).resolve()}"


@dataclass(frozen=True)
class _WalConnect:
    """SQLAlchemy ``creator`` for the study file: WAL journal, ``synchronous=NORMAL``.

    A stage report writes several rows, and in the default rollback-journal mode every commit
    waits for an fsync; in WAL mode with NORMAL sync a commit is a write to the log. The database
    stays consistent if the process (or the machine) dies; a power cut may lose the last commits.
    A class, not a closure: Tune pickles the searcher and its storage.
    """

    path: str

    def __call__(self) -> sqlite3.Connection:
        con = sqlite3.connect(self.path, timeout=60, check_same_thread=False)
        con.execute("PRAGMA journal_mode=WAL")
        con.execute("PRAGMA synchronous=NORMAL")
        return con


def open_storage(path: str | Path) -> RDBStorage:
    """The study's storage; a generous lock timeout because the dashboard may read while we write."""
    real = Path(path).resolve()
    return RDBStorage(storage_url(real), engine_kwargs={"creator": _WalConnect(str(real))})


def readonly_storage(path: str | Path) -> RDBStorage:
    """Storage on the study file that cannot write to it (SQLite ``mode=ro``): reading a finished
    study leaves it one file (no journal-mode change, no ``-wal``/``-shm``)."""
    real = Path(path).resolve()
    uri = f"file:{urllib.parse.quote(str(real))}?mode=ro"

    # Our own connect: SQLAlchemy would percent-decode a URI given in the URL, breaking paths with
    # characters such as '#' or '?'.
    def connect() -> sqlite3.Connection:
        return sqlite3.connect(uri, uri=True, timeout=60, check_same_thread=False)

    return RDBStorage(f"sqlite:///{real}", skip_table_creation=True, engine_kwargs={"creator": connect})


def is_optuna_db(path: str | Path) -> bool:
    """True for an SQLite file with Optuna's schema (checked without creating anything)."""
    p = Path(path)
    if not p.is_file() or p.stat().st_size == 0:
        return False
    try:
        # Quoted: a '#' or '?' in the folder name would otherwise end the URI's path.
        con = sqlite3.connect(f"file:{urllib.parse.quote(str(p.resolve()))}?mode=ro", uri=True, timeout=5)
        try:
            rows = con.execute("SELECT name FROM sqlite_master WHERE type='table' AND name='version_info'").fetchall()
        finally:
            con.close()
    except sqlite3.Error:
        return False
    return bool(rows)


def directions_for(space: LoadedSpace) -> list[str]:
    search = space.space.search
    assert search is not None
    return ["maximize", "minimize"] if search.objective.cost_objective else ["maximize"]


def _space_fingerprint(text: str) -> str:
    """What in a space changes the trials, as canonical JSON.

    Comments, formatting, the description, the runtime defaults (resources) and whether the dataset
    may be downloaded may change between a search and its resume; the problem, recipes and search
    ranges may not.
    """
    import yaml

    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError:
        return text
    if isinstance(data, dict):
        data = {k: v for k, v in data.items() if k not in ("name", "description", "runtime")}
        problem = data.get("problem")
        if isinstance(problem, dict) and isinstance(problem.get("dataset"), dict):
            problem["dataset"].pop("download", None)
    return json.dumps(data, sort_keys=True, default=str)


def check_name_free(studies_dir: str | Path, study: str) -> None:
    """A UserError if ``study`` already has a file: a name in use is never merged into."""
    path = db_path(studies_dir, study)
    if path.exists() and path.stat().st_size > 0:
        raise UserError(f"study {study} already exists in {path}; use --resume or another --study")


def create_study(space: LoadedSpace, studies_dir: str | Path, study: str, *, seed: int, budget: int,
                 teacher_path: str | None = None, teacher_sha256: str | None = None,
                 storage: RDBStorage | None = None) -> optuna.Study:
    """Create a new study (schema first); a name already in use is a UserError, never a merge.

    ``storage``: the study file's storage, if the caller opened it (it keeps it for later writes);
    then the caller has checked with :func:`check_name_free` before opening it (which makes the file).
    """
    if storage is None:
        check_name_free(studies_dir, study)
        db_path(studies_dir, study).parent.mkdir(parents=True, exist_ok=True)
        storage = open_storage(db_path(studies_dir, study))
    dirs = directions_for(space)
    st = optuna.create_study(storage=storage, study_name=study, directions=dirs)
    write_study_attrs(st, StudyAttrs(space_path=str(Path(space.path).resolve()), space_sha256=space.sha256,
                                     space_yaml=space.text, space_name=space.space.name, seed=seed, budget=budget))
    if teacher_sha256 is not None:
        bind_teacher(st, teacher_path=str(teacher_path), teacher_sha256=teacher_sha256)
    return st


def bind_teacher(study: optuna.Study, *, teacher_path: str, teacher_sha256: str) -> None:
    """Record the study's teacher, or check that it is the one the study was searched with."""
    known = StudyAttrs.of(study).teacher_sha256
    if known is None:
        write_study_attrs(study, StudyAttrs(teacher_sha256=teacher_sha256, teacher_path=str(teacher_path)))
    elif known != teacher_sha256:
        raise UserError(
            f"--resume: study {study.study_name} was searched with teacher {str(known)[:12]}, the cache "
            f"now holds {teacher_sha256[:12]} ({teacher_path}); resume with that teacher or start a new --study"
        )


def load_study_for_resume(space: LoadedSpace, studies_dir: str | Path, study: str, *,
                          budget: int, storage: RDBStorage | None = None) -> optuna.Study:
    """The existing study, checked against this space, with its budget updated.

    The teacher is checked by :func:`bind_teacher` once it is ensured.
    """
    path = db_path(studies_dir, study)
    if not is_optuna_db(path):
        raise UserError(f"--resume: no study {study} to resume ({path} not found)")
    storage = storage or open_storage(path)
    try:
        st = optuna.load_study(study_name=study, storage=storage)
    except KeyError:
        raise UserError(f"--resume: {path} holds no study named {study}") from None
    attrs = StudyAttrs.of(st)
    if attrs.space_sha256 != space.sha256 and \
            _space_fingerprint(attrs.space_yaml or "") != _space_fingerprint(space.text):
        raise UserError(
            f"--resume: study {study} was made with another space ({attrs.space_path}); "
            f"resume it with that space, or start a new --study"
        )
    want = [d.lower() for d in directions_for(space)]
    have = [d.name.lower() for d in st.directions]
    if want != have:
        raise UserError(f"--resume: study {study} optimises {have}, the space asks for {want}")
    if attrs.budget != budget:
        write_study_attrs(st, StudyAttrs(budget=budget))
    return st


class StudyLock:
    """A pid file beside the study, so that two searches never run one study at once.

    A lock left by a process that no longer runs (killed hard) is taken over.
    """

    def __init__(self, studies_dir: str | Path, study: str):
        self.path = Path(studies_dir) / f"{study}.lock"
        self._held = False

    def _owner(self) -> tuple[str, int] | None:
        try:
            host, pid = self.path.read_text().split()
            return host, int(pid)
        except (OSError, ValueError):
            return None

    def acquire(self) -> StudyLock:
        me = f"{socket.gethostname()} {os.getpid()}"
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                owner = self._owner()
                if owner and owner[0] == socket.gethostname() and _pid_alive(owner[1]) and owner[1] != os.getpid():
                    raise UserError(f"study {self.path.stem} is in use by process {owner[1]} ({self.path})") from None
                if owner and owner[0] != socket.gethostname():
                    raise UserError(f"study {self.path.stem} is in use on host {owner[0]} ({self.path}); "
                                    "delete the lock file if that search is gone") from None
                self.path.unlink(missing_ok=True)  # stale: its process is gone
                continue
            with os.fdopen(fd, "w") as f:
                f.write(me)
            self._held = True
            return self
        raise UserError(f"cannot lock study {self.path.stem} ({self.path})")

    def release(self) -> None:
        if self._held:
            self.path.unlink(missing_ok=True)
            self._held = False

    def __enter__(self) -> StudyLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def fail_trial(storage: optuna.storages.BaseStorage, study_name: str, number: int, reason: str, *,
               interrupted: bool) -> bool:
    """Mark an unfinished trial FAIL with ``reason``; False if it finished meanwhile.

    Through the storage's public API (trial number -> trial id), as another process's trial has
    no ``optuna.Trial`` object here.
    """
    trial_id = storage.get_trial_id_from_study_id_trial_number(storage.get_study_id_from_name(study_name), number)
    try:
        write_trial_attrs_by_number(storage, study_name, number,
                                    TrialAttrs(fail_reason=reason, interrupted=True if interrupted else None))
        return storage.set_trial_state_values(trial_id, TrialState.FAIL)
    except optuna.exceptions.UpdateFinishedTrialError:
        return False


def fail_orphans(storage: optuna.storages.BaseStorage, study: optuna.Study, reason: str) -> list[int]:
    """Mark every RUNNING trial FAIL (interrupted), returning their numbers.

    Only valid while this process holds the study's lock: then no live search owns those trials.
    Leaving them RUNNING would make TPE's constant liar steer away from their parameters forever.
    ``storage`` is the one ``study`` was opened on.
    """
    done = []
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        if fail_trial(storage, study.study_name, t.number, reason, interrupted=True):
            done.append(t.number)
    return done


def counts_by_state(trials: Sequence[FrozenTrial | TrialRecord]) -> dict[str, int]:
    counts = {s.name: 0 for s in (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL,
                                  TrialState.RUNNING, TrialState.WAITING)}
    for t in trials:
        counts[t.state.name] = counts.get(t.state.name, 0) + 1
    return counts


# Shorthands on a trial or its record (see TrialRecord for what each means).
def epochs_trained(t: FrozenTrial | TrialRecord) -> int:
    """Cumulative epochs a trial actually trained: its last report (a pruned trial may stop mid-stage)."""
    return record(t).epochs_trained


def finished_for_good(t: FrozenTrial | TrialRecord) -> bool:
    return record(t).finished_for_good


def is_repeat(t: FrozenTrial | TrialRecord) -> bool:
    return record(t).is_repeat


def counts_toward_budget(t: FrozenTrial | TrialRecord) -> bool:
    return record(t).counts_toward_budget


@dataclass
class StudyInfo:
    name: str
    db_path: Path
    counts: dict[str, int]
    n_trials: int
    best_value: float | None
    best_trial: int | None
    best_sequence: str | None
    budget: int | None
    space_path: str | None
    directions: list[str] = field(default_factory=list)
    error: str | None = None
    n_confirmation_runs: int = 0  # beside n_trials (the budget's)
    n_repeats: int = 0  # beside n_trials: repeats of finished plans answered from the study
    best_confirmed_seeds: int = 0  # best_value is the mean over these many fresh seeds (0: one run)


def study_info(path: str | Path) -> StudyInfo:
    p = Path(path)
    name = p.stem
    st = optuna.load_study(study_name=name, storage=readonly_storage(p))
    trials = [TrialRecord.from_trial(t) for t in st.get_trials(deepcopy=False)]
    # The study's one ranking: the recommendation, by its confirmed mean where it was confirmed.
    ranked = rank_trials(trials)
    best = ranked[0] if ranked else None
    confirmed = confirmations(trials).get(best.number) if best is not None else None
    searched = [t for t in trials if not t.is_confirmation]
    repeats = [t for t in searched if t.is_repeat]
    budget_trials = [t for t in searched if not t.is_repeat]
    attrs = StudyAttrs.of(st)
    return StudyInfo(
        name=name,
        db_path=p,
        counts=counts_by_state(budget_trials),
        n_trials=len(budget_trials),
        n_repeats=len(repeats),
        n_confirmation_runs=len(trials) - len(searched),
        best_confirmed_seeds=confirmed.n if confirmed is not None else 0,
        best_value=(confirmed.mean if confirmed is not None else best.value) if best else None,
        best_trial=best.number if best else None,
        best_sequence=best.sequence if best else None,
        budget=attrs.budget,
        space_path=attrs.space_path,
        directions=[d.name.lower() for d in st.directions],
    )


def list_studies(studies_dir: str | Path = Path("studies")) -> list[StudyInfo]:
    """Every study under ``studies_dir`` (``*.db`` files with Optuna's schema), by name.

    A file that cannot be read is listed with its error instead of raising.
    """
    out: list[StudyInfo] = []
    d = Path(studies_dir)
    if not d.is_dir():
        return out
    for p in sorted(d.glob("*.db")):
        if not is_optuna_db(p):
            continue
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                out.append(study_info(p))
        except Exception as exc:  # noqa: BLE001 - one unreadable study must not hide the others
            out.append(StudyInfo(p.stem, p, {}, 0, None, None, None, None, None, error=str(exc).splitlines()[0]))
    return out


__all__ = [
    "ATTR_EPOCHS_REUSED",
    "ATTR_EPOCHS_TRAINED",
    "ATTR_FAIL_REASON",
    "ATTR_PRUNED_REASON",
    "ATTR_INFRA",
    "ATTR_STORAGE_ROOT",
    "ATTR_INTERRUPTED",
    "ATTR_N_VAL",
    "ATTR_PLAN",
    "ATTR_RESUME_FROM",
    "ATTR_RETRY_OF",
    "ATTR_SEQUENCE",
    "ATTR_EPOCH_VAL_ACC",
    "ATTR_STAGE_CUM_EPOCHS",
    "ATTR_STAGE_REPORTED_AT",
    "ATTR_NODE",
    "ATTR_STAGE_VAL_ACC",
    "ATTR_THREADS",
    "ATTR_TOTAL_EPOCHS",
    "StudyInfo",
    "StudyLock",
    "bind_teacher",
    "counts_by_state",
    "counts_toward_budget",
    "epochs_trained",
    "create_study",
    "db_path",
    "fail_orphans",
    "is_repeat",
    "list_studies",
    "load_study_for_resume",
    "open_storage",
    "storage_url",
    "study_info",
    "study_name_from",
]
