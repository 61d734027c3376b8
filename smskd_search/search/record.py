"""The study record: every name the search stores on an Optuna study and its trials, read and written here.

Optuna keeps a trial's extra facts as JSON user attributes under string names; this module is the
only one that spells those names. Other modules read a trial as a :class:`TrialRecord`
(:meth:`TrialRecord.from_trial`: typed fields, the plan parsed once), the study's own attributes as
a :class:`StudyAttrs`, and write through :func:`write_trial_attrs`, :func:`write_trial_attrs_by_number`
and :func:`write_study_attrs`, or enqueue with :meth:`TrialAttrs.stored`. The stored names and their
JSON values are a format: studies written by earlier versions must keep loading.

Also here: what Tune hands a trainable (:class:`TrialConfig`), and a plan's confirmation
(:class:`Confirmed`, :func:`confirmations`), which is a reading of the confirmation runs' records.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

import yaml
from optuna.trial import FrozenTrial, TrialState

from smskd_search.plan import Plan, parse_plan
from smskd_search.stats import mean_se

# ------------------------------------------------------------------------------ stored trial names
ATTR_PLAN = "plan"  # the plan the trial ran, as YAML
ATTR_SEQUENCE = "sequence"
ATTR_TOTAL_EPOCHS = "total_epochs"
ATTR_THREADS = "threads"
ATTR_N_VAL = "n_val"
ATTR_STAGE_VAL_ACC = "stage_val_acc"
ATTR_STAGE_CUM_EPOCHS = "stage_cum_epochs"
ATTR_STAGE_REPORTED_AT = "stage_reported_at"  # unix times the driver received each stage's report
ATTR_EPOCH_VAL_ACC = "epoch_val_acc"  # val accuracy after every epoch 1..last (the learning curve)
# Epochs of the trial taken from the stage-prefix cache, and trained by it (absent: not recorded).
ATTR_EPOCHS_REUSED = "epochs_reused"
ATTR_EPOCHS_TRAINED = "epochs_trained"
ATTR_IMAGES_TRAINED = "images_trained"  # the training images of the epochs it trained (the summary's rate)
# Trained epochs whose teacher logits came from the teacher-logit store, and the seconds the trial
# waited for another trial computing one (absent: none, or not recorded).
ATTR_TEACHER_EPOCHS_SERVED = "teacher_epochs_served"
ATTR_TEACHER_WAIT_S = "teacher_wait_s"
ATTR_FAIL_REASON = "fail_reason"
ATTR_FAIL_TRACEBACK = "fail_traceback"
ATTR_PRUNED_REASON = "pruned_reason"  # the rung, the trial's value and the cutoff it fell below
ATTR_TRIAL_SECONDS = "trial_seconds"  # time inside the trainable up to the last stage reported
ATTR_TRIAL_STARTED_AT = "trial_started_at"  # unix time the trainable started (Optuna's start is the ask)
ATTR_NODE = "node"  # the Ray node id the trial ran on (where its checkpoints were written from)
# Set on trials that ended FAIL because the search stopped under them (not because the plan failed):
# they do not count against the budget, and a resume runs their plan again.
ATTR_INTERRUPTED = "interrupted"
# A failure of the machinery, not of the plan (storage, memory, a lost worker): retried, off the budget.
ATTR_INFRA = "infrastructure_failure"
ATTR_RETRY_OF = "retry_of"
# The interrupted trials a rerun may take stage checkpoints from, nearest first (a rerun can be
# interrupted too, before or after it copied its predecessor's checkpoints).
ATTR_RESUME_FROM = "resume_from"
ATTR_RUN_DIR = "run_dir"
# The dataset root the trial read, made absolute on the driver (the stored plan keeps the space's).
ATTR_DATA_ROOT = "data_root"
ATTR_REPLAYED_STAGES = "replayed_stages"
# Plan.canonical_hash() of the trial's plan, and, on a trial answered from the study instead of
# trained, the number of the finished trial with the same plan whose result it took.
ATTR_PLAN_KEY = "plan_key"
ATTR_REPEAT_OF = "repeat_of"
# Confirmation runs (after the budget): the trial whose plan they re-run, and their fresh seed.
ATTR_CONFIRM_OF = "confirm_of"
ATTR_CONFIRM_SEED = "confirm_seed"
# Read by the define-by-run function from an enqueued trial: a baseline's label, and a plan the
# space cannot express as parameters (then the trial has none).
BASELINE_ATTR = "baseline"
FIXED_PLAN_ATTR = "fixed_plan"

# ------------------------------------------------------------------------------ stored study names
STUDY_SPACE_PATH = "space_path"
STUDY_SPACE_SHA256 = "space_sha256"
STUDY_SPACE_YAML = "space_yaml"
STUDY_SPACE_NAME = "space_name"
STUDY_SEED = "seed"
STUDY_BUDGET = "budget"
STUDY_TEACHER_SHA256 = "teacher_sha256"
STUDY_TEACHER_PATH = "teacher_path"
# The folder the trials write under (--storage, or the studies folder).
ATTR_STORAGE_ROOT = "storage_root"

Phase = Literal["search", "confirm"]


class _HasUserAttrs(Protocol):
    @property
    def user_attrs(self) -> dict[str, Any]: ...


class _SetsUserAttrs(Protocol):
    def set_user_attr(self, key: str, value: Any) -> None: ...


def _ints(v: Any) -> tuple[int, ...] | None:
    return tuple(int(x) for x in v) if v is not None else None


def _floats(v: Any) -> tuple[float, ...] | None:
    return tuple(float(x) for x in v) if v is not None else None


def _opt(kind: Any, v: Any) -> Any:
    return kind(v) if v is not None else None


# Field of TrialAttrs -> (stored name, how a stored JSON value becomes the field's type).
_TRIAL_FIELDS: dict[str, tuple[str, Any]] = {
    "plan_yaml": (ATTR_PLAN, functools.partial(_opt, str)),
    "sequence": (ATTR_SEQUENCE, functools.partial(_opt, str)),
    "total_epochs": (ATTR_TOTAL_EPOCHS, functools.partial(_opt, int)),
    "threads": (ATTR_THREADS, functools.partial(_opt, int)),
    "n_val": (ATTR_N_VAL, functools.partial(_opt, int)),
    "stage_cum_epochs": (ATTR_STAGE_CUM_EPOCHS, _ints),
    "stage_val_acc": (ATTR_STAGE_VAL_ACC, _floats),
    "stage_reported_at": (ATTR_STAGE_REPORTED_AT, _floats),
    "epoch_val_acc": (ATTR_EPOCH_VAL_ACC, lambda v: tuple(v) if v is not None else None),
    "epochs_reused": (ATTR_EPOCHS_REUSED, functools.partial(_opt, int)),
    "epochs_trained": (ATTR_EPOCHS_TRAINED, functools.partial(_opt, int)),
    "images_trained": (ATTR_IMAGES_TRAINED, functools.partial(_opt, int)),
    "teacher_epochs_served": (ATTR_TEACHER_EPOCHS_SERVED, functools.partial(_opt, float)),
    "teacher_wait_s": (ATTR_TEACHER_WAIT_S, functools.partial(_opt, float)),
    "fail_reason": (ATTR_FAIL_REASON, functools.partial(_opt, str)),
    "fail_traceback": (ATTR_FAIL_TRACEBACK, functools.partial(_opt, str)),
    "pruned_reason": (ATTR_PRUNED_REASON, functools.partial(_opt, str)),
    "trial_seconds": (ATTR_TRIAL_SECONDS, functools.partial(_opt, float)),
    "trial_started_at": (ATTR_TRIAL_STARTED_AT, functools.partial(_opt, float)),
    "node": (ATTR_NODE, functools.partial(_opt, str)),
    "interrupted": (ATTR_INTERRUPTED, functools.partial(_opt, bool)),
    "infrastructure": (ATTR_INFRA, functools.partial(_opt, bool)),
    "retry_of": (ATTR_RETRY_OF, functools.partial(_opt, int)),
    "resume_from": (ATTR_RESUME_FROM, _ints),
    "run_dir": (ATTR_RUN_DIR, functools.partial(_opt, str)),
    "data_root": (ATTR_DATA_ROOT, functools.partial(_opt, str)),
    "replayed_stages": (ATTR_REPLAYED_STAGES, functools.partial(_opt, int)),
    "plan_key": (ATTR_PLAN_KEY, functools.partial(_opt, str)),
    "repeat_of": (ATTR_REPEAT_OF, functools.partial(_opt, int)),
    "confirm_of": (ATTR_CONFIRM_OF, functools.partial(_opt, int)),
    "confirm_seed": (ATTR_CONFIRM_SEED, functools.partial(_opt, int)),
    "baseline": (BASELINE_ATTR, functools.partial(_opt, str)),
    "fixed_plan": (FIXED_PLAN_ATTR, functools.partial(_opt, str)),
}
# Every name a trial may store (a study written by this version stores no other).
TRIAL_ATTR_NAMES = frozenset(name for name, _ in _TRIAL_FIELDS.values())


@dataclass(frozen=True)
class TrialAttrs:
    """A trial's stored user attributes, typed; None where the trial has not stored one.

    Lists are read as tuples; :meth:`stored` gives the name -> JSON value mapping Optuna keeps.
    ``interrupted`` and ``infrastructure`` are stored only when true.
    """

    plan_yaml: str | None = None
    sequence: str | None = None
    total_epochs: int | None = None
    threads: int | None = None
    n_val: int | None = None
    stage_cum_epochs: tuple[int, ...] | None = None
    stage_val_acc: tuple[float, ...] | None = None
    stage_reported_at: tuple[float, ...] | None = None
    epoch_val_acc: tuple[float | None, ...] | None = None
    epochs_reused: int | None = None
    epochs_trained: int | None = None
    images_trained: int | None = None
    teacher_epochs_served: float | None = None
    teacher_wait_s: float | None = None
    fail_reason: str | None = None
    fail_traceback: str | None = None
    pruned_reason: str | None = None
    trial_seconds: float | None = None
    trial_started_at: float | None = None
    node: str | None = None
    interrupted: bool | None = None
    infrastructure: bool | None = None
    retry_of: int | None = None
    resume_from: tuple[int, ...] | None = None
    run_dir: str | None = None
    data_root: str | None = None
    replayed_stages: int | None = None
    plan_key: str | None = None
    repeat_of: int | None = None
    confirm_of: int | None = None
    confirm_seed: int | None = None
    baseline: str | None = None
    fixed_plan: str | None = None

    @classmethod
    def from_stored(cls, attrs: Mapping[str, Any]) -> TrialAttrs:
        """From Optuna's user-attribute mapping (names this version does not know are ignored)."""
        return cls(**{f: conv(attrs.get(name)) for f, (name, conv) in _TRIAL_FIELDS.items()})

    @classmethod
    def of(cls, trial: _HasUserAttrs) -> TrialAttrs:
        """The attributes of a live ``optuna.Trial``, a ``FixedTrial`` or a ``FrozenTrial``."""
        return cls.from_stored(trial.user_attrs)

    def stored(self) -> dict[str, Any]:
        """The attributes as Optuna stores them: stored name -> JSON value, unset fields left out."""
        out: dict[str, Any] = {}
        for f, (name, _) in _TRIAL_FIELDS.items():
            value = getattr(self, f)
            if value is None or (f in ("interrupted", "infrastructure") and not value):
                continue
            out[name] = list(value) if isinstance(value, tuple) else value
        return out

    def replace(self, **changes: Any) -> TrialAttrs:
        return dataclasses.replace(self, **changes)


def write_trial_attrs(trial: _SetsUserAttrs, attrs: TrialAttrs) -> None:
    """Store ``attrs``'s set fields on a live trial (``optuna.Trial`` or ``FixedTrial``)."""
    for name, value in attrs.stored().items():
        trial.set_user_attr(name, value)


def write_trial_attrs_by_number(storage: Any, study_name: str, number: int, attrs: TrialAttrs) -> None:
    """Store ``attrs`` on another process's trial, through the storage's public API (number -> id)."""
    trial_id = storage.get_trial_id_from_study_id_trial_number(storage.get_study_id_from_name(study_name), number)
    for name, value in attrs.stored().items():
        storage.set_trial_user_attr(trial_id, name, value)


# ------------------------------------------------------------------------------------ trial record
@dataclass(frozen=True)
class TrialRecord:
    """A trial as the search reads it: Optuna's facts plus its typed stored attributes.

    Args:
        number: The trial number.
        state: Optuna's state.
        values: The objective values (val accuracy first); empty unless COMPLETE.
        params: The sampled parameters.
        intermediate_values: Reports by cumulative epochs (stage ends and rungs).
        attrs: The stored user attributes.
    """

    number: int
    state: TrialState
    values: tuple[float, ...]
    params: Mapping[str, Any]
    intermediate_values: Mapping[int, float]
    attrs: TrialAttrs

    @classmethod
    def from_trial(cls, t: FrozenTrial) -> TrialRecord:
        return cls(t.number, t.state, tuple(float(v) for v in t.values or ()), dict(t.params),
                   {int(k): float(v) for k, v in t.intermediate_values.items()}, TrialAttrs.of(t))

    # -------------------------------------------------------------- what it measured
    @property
    def value(self) -> float | None:
        """The val accuracy (the first objective); None unless COMPLETE."""
        return self.values[0] if self.values else None

    @property
    def last_value(self) -> float | None:
        """The val accuracy, or for a trial stopped early its last report."""
        if self.values:
            return self.values[0]
        if self.intermediate_values:
            return self.intermediate_values[max(self.intermediate_values)]
        return None

    @property
    def stage_values(self) -> list[tuple[int, float]]:
        """(cumulative epochs, val acc) at each stage end the trial reached, exactly as stored."""
        cum, acc = self.attrs.stage_cum_epochs, self.attrs.stage_val_acc
        if cum is not None and acc is not None and len(cum) == len(acc):
            return list(zip(cum, acc))
        return sorted(self.intermediate_values.items())

    @property
    def epochs_trained(self) -> int:
        """Cumulative epochs the trial actually trained: its last report (a pruned trial may stop mid-stage)."""
        steps = list(self.intermediate_values) or list(self.attrs.stage_cum_epochs or [0])
        return int(max(steps))

    # -------------------------------------------------------------- its plan
    @functools.cached_property
    def plan(self) -> Plan | None:
        """The plan the trial ran, parsed from its stored YAML (None where none is stored)."""
        if not self.attrs.plan_yaml:
            return None
        return parse_plan(yaml.safe_load(self.attrs.plan_yaml), source=f"trial {self.number} plan")

    @property
    def plan_key(self) -> str | None:
        """The plan's :meth:`Plan.canonical_hash` (computed from the plan in studies made before
        the attribute existed); None without a plan."""
        if self.attrs.plan_key is not None:
            return self.attrs.plan_key
        return self.plan.canonical_hash() if self.plan is not None else None

    @property
    def sequence(self) -> str | None:
        return self.attrs.sequence

    @property
    def total_epochs(self) -> int | None:
        return self.attrs.total_epochs

    @property
    def n_val(self) -> int | None:
        return self.attrs.n_val

    @property
    def baseline(self) -> str | None:
        """The baseline's label, for an enqueued baseline."""
        return self.attrs.baseline or None

    # -------------------------------------------------------------- where it stands
    @property
    def phase(self) -> Phase:
        """``confirm`` for a confirmation run after the budget, else ``search``."""
        return "confirm" if self.attrs.confirm_of is not None else "search"

    @property
    def is_confirmation(self) -> bool:
        return self.attrs.confirm_of is not None

    @property
    def is_repeat(self) -> bool:
        """A trial answered from the study: its plan had finished already (``repeat_of`` names that trial)."""
        return self.attrs.repeat_of is not None

    @property
    def interrupted(self) -> bool:
        return bool(self.attrs.interrupted)

    @property
    def infrastructure(self) -> bool:
        return bool(self.attrs.infrastructure)

    @property
    def finished_for_good(self) -> bool:
        """COMPLETE, PRUNED, or failed through its plan (not cut short by the search, not by the
        infrastructure: those are re-run)."""
        if self.state in (TrialState.COMPLETE, TrialState.PRUNED):
            return True
        return self.state == TrialState.FAIL and not self.interrupted and not self.infrastructure

    @property
    def counts_toward_budget(self) -> bool:
        """Finished for good, except the confirmation runs after the budget and the repeats of
        finished plans answered from the study (nothing trained)."""
        return self.finished_for_good and not self.is_confirmation and not self.is_repeat


def record(t: FrozenTrial | TrialRecord) -> TrialRecord:
    """``t`` as a record (a record is returned as it is)."""
    return t if isinstance(t, TrialRecord) else TrialRecord.from_trial(t)


def records(trials: Iterable[FrozenTrial | TrialRecord]) -> list[TrialRecord]:
    return [record(t) for t in trials]


# ------------------------------------------------------------------------------------ study record
_STUDY_FIELDS: dict[str, tuple[str, Any]] = {
    "space_path": (STUDY_SPACE_PATH, functools.partial(_opt, str)),
    "space_sha256": (STUDY_SPACE_SHA256, functools.partial(_opt, str)),
    "space_yaml": (STUDY_SPACE_YAML, functools.partial(_opt, str)),
    "space_name": (STUDY_SPACE_NAME, functools.partial(_opt, str)),
    "seed": (STUDY_SEED, functools.partial(_opt, int)),
    "budget": (STUDY_BUDGET, functools.partial(_opt, int)),
    "teacher_sha256": (STUDY_TEACHER_SHA256, functools.partial(_opt, str)),
    "teacher_path": (STUDY_TEACHER_PATH, functools.partial(_opt, str)),
    "storage_root": (ATTR_STORAGE_ROOT, functools.partial(_opt, str)),
}
STUDY_ATTR_NAMES = frozenset(name for name, _ in _STUDY_FIELDS.values())


@dataclass(frozen=True)
class StudyAttrs:
    """The study's stored user attributes: the space and teacher it was made with, its budget, and
    where its trials write; None where not stored."""

    space_path: str | None = None
    space_sha256: str | None = None
    space_yaml: str | None = None
    space_name: str | None = None
    seed: int | None = None
    budget: int | None = None
    teacher_sha256: str | None = None
    teacher_path: str | None = None
    storage_root: str | None = None

    @classmethod
    def of(cls, study: _HasUserAttrs) -> StudyAttrs:
        attrs = study.user_attrs
        return cls(**{f: conv(attrs.get(name)) for f, (name, conv) in _STUDY_FIELDS.items()})

    def stored(self) -> dict[str, Any]:
        return {name: getattr(self, f) for f, (name, _) in _STUDY_FIELDS.items() if getattr(self, f) is not None}


def write_study_attrs(study: _SetsUserAttrs, attrs: StudyAttrs) -> None:
    """Store ``attrs``'s set fields on the study."""
    for name, value in attrs.stored().items():
        study.set_user_attr(name, value)


# ------------------------------------------------------------------------------------ confirmation
@dataclass(frozen=True)
class Confirmed:
    """A plan's confirmation: val accuracy per fresh seed, their mean and its standard error."""

    number: int
    by_seed: dict[int, float]

    @property
    def n(self) -> int:
        return len(self.by_seed)

    @property
    def mean(self) -> float:
        return mean_se(list(self.by_seed.values()))[0]

    @property
    def se(self) -> float | None:
        return mean_se(list(self.by_seed.values()))[1]

    def paired_difference(self, other: Confirmed) -> tuple[float, float | None, int] | None:
        """Mean and s.e. of (this - other) over the seeds both ran, and how many; None if none."""
        seeds = sorted(set(self.by_seed) & set(other.by_seed))
        if not seeds:
            return None
        mean, se = mean_se([self.by_seed[s] - other.by_seed[s] for s in seeds])
        return mean, se, len(seeds)


def confirmations(trials: Iterable[FrozenTrial | TrialRecord]) -> dict[int, Confirmed]:
    """The COMPLETE confirmation runs of the study, by the trial they confirm."""
    by: dict[int, dict[int, float]] = {}
    for r in records(trials):
        if r.is_confirmation and r.state == TrialState.COMPLETE and r.value is not None:
            assert r.attrs.confirm_of is not None and r.attrs.confirm_seed is not None
            by.setdefault(r.attrs.confirm_of, {})[r.attrs.confirm_seed] = r.value
    return {n: Confirmed(n, dict(sorted(v.items()))) for n, v in by.items()}


# ------------------------------------------------------------------------------------ Tune's config
@dataclass(frozen=True)
class TrialConfig:
    """What Tune hands the trainable for one trial (Tune keeps it as a plain dict).

    Args:
        plan_yaml: The plan to train, as YAML.
        sequence: The plan's stages in words (the progress line shows it).
        plan_key: :meth:`Plan.canonical_hash`; the searcher answers a plan already finished in the
            study from it.
        run_dir: Where the trial writes its stage checkpoints (a folder or a URI).
        resume_dirs: The interrupted runs of this plan it may take stage checkpoints from.
        threads: torch threads.
        baseline: The baseline's label (a baseline is measured in full, never pruned).
        rung_epochs: Cumulative epochs at which the trial also reports mid-stage (pruning at rungs).
        data_root: The dataset root as the driver resolved it (None: the dataset's default place).
        confirmation: A confirmation run (measured in full, never pruned, not recorded at the rungs).
    """

    plan_yaml: str
    sequence: str
    plan_key: str
    run_dir: str
    resume_dirs: list[str] = field(default_factory=list)
    threads: int = 1
    baseline: str | None = None
    rung_epochs: list[int] = field(default_factory=list)
    data_root: str | None = None
    confirmation: bool = False

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, config: Mapping[str, Any]) -> TrialConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in config.items() if k in known})


__all__ = [
    "BASELINE_ATTR",
    "FIXED_PLAN_ATTR",
    "Confirmed",
    "Phase",
    "STUDY_ATTR_NAMES",
    "TRIAL_ATTR_NAMES",
    "StudyAttrs",
    "TrialAttrs",
    "TrialConfig",
    "TrialRecord",
    "confirmations",
    "record",
    "records",
    "write_study_attrs",
    "write_trial_attrs",
    "write_trial_attrs_by_number",
]
