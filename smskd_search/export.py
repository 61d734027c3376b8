"""Export: a study's completed trials as plan files that ``smskd-search train`` runs as they are.

Every exported plan is the trial's own plan (its ``plan`` user attribute, the YAML the trial ran)
plus provenance: where it came from (study, trial, space and its hash, teacher hash), what the
search measured (val accuracy with its sample size, the value at every stage end) and the torch
thread count the trial used, because CPU results depend on it and ``train`` reads it back.

Studies are opened read-only (SQLite ``mode=ro``): exporting or reporting never writes to a study,
even while a search is writing to it. The helpers that read a study live here and serve ``report``.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna
import yaml
from optuna.trial import FrozenTrial, TrialState

from smskd_search.errors import UserError
from smskd_search.plan import Plan, save_plan
from smskd_search.search.leaderboard import rank_trials
from smskd_search.search.record import StudyAttrs, TrialRecord, confirmations, record, records
from smskd_search.search.sampling import plan_from_params
from smskd_search.search.storage import db_path, is_optuna_db, readonly_storage
from smskd_search.stats import binomial_se

DEFAULT_TOP = 3


# ------------------------------------------------------------------------------- reading a study
def existing_studies(studies_dir: str | Path) -> list[Path]:
    d = Path(studies_dir)
    return sorted(p for p in d.glob("*.db") if is_optuna_db(p)) if d.is_dir() else []


def find_study_db(studies_dir: str | Path, study: str) -> Path:
    """The SQLite file of ``study`` (a name under ``studies_dir``, or a path to a ``.db`` file)."""
    given = Path(study)
    if given.suffix == ".db" and given.is_file():
        if not is_optuna_db(given):
            raise UserError(f"{given}: not an Optuna study database (no schema yet?)")
        return given
    path = db_path(studies_dir, study)
    if is_optuna_db(path):
        return path
    names = [p.stem for p in existing_studies(studies_dir)]
    known = f"studies in {studies_dir}: {', '.join(names)}" if names else f"no studies in {studies_dir}"
    if path.is_file():
        raise UserError(f"study {study}: {path} has no Optuna schema yet (being created?); {known}")
    raise UserError(f"no study {study!r} ({path} not found); {known}")


def open_study(path: str | Path, name: str | None = None) -> optuna.Study:
    """The study in ``path``, read-only: the one named like the file, or the file's only study."""
    storage = readonly_storage(path)
    names = optuna.get_all_study_names(storage)
    want = name or Path(path).stem
    if want not in names:
        if len(names) != 1:
            raise UserError(f"{path}: holds studies {names}, none named {want!r}")
        want = names[0]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return optuna.load_study(study_name=want, storage=storage)


def val_acc(t: FrozenTrial | TrialRecord) -> float | None:
    """The trial's val accuracy (the first objective; a PRUNED trial's last stage value)."""
    return record(t).last_value


def stage_values(t: FrozenTrial | TrialRecord) -> list[tuple[int, float]]:
    """(cumulative epochs, val acc) at each stage end the trial reached, exactly as stored."""
    return record(t).stage_values


def trial_n_val(db: str | Path, number: int) -> int | None:
    """The validation size a trial was scored on (for printing an accuracy with its n)."""
    st = open_study(db)
    t = next((t for t in st.get_trials(deepcopy=False) if t.number == number), None)
    return record(t).n_val if t is not None else None


def ranked_trials(study: optuna.Study) -> list[TrialRecord]:
    """The study's one ranking (:func:`smskd_search.search.rank_trials`): distinct completed plans,
    by confirmed mean where confirmed, else by val accuracy; ties to fewer epochs, then the earlier trial."""
    return rank_trials(study.get_trials(deepcopy=False))


def trial_plan(study: optuna.Study, trial: FrozenTrial | TrialRecord) -> Plan:
    """The plan the trial ran: its stored YAML, else rebuilt from its parameters and the study's space."""
    t = record(trial)
    if t.plan is not None:
        return t.plan
    attrs = StudyAttrs.of(study)
    if not attrs.space_yaml:
        raise UserError(f"trial {t.number}: neither its plan nor the study's space is stored")
    from smskd_search.space import Space

    space = Space.model_validate(yaml.safe_load(attrs.space_yaml))
    return plan_from_params(dict(t.params), space, attrs.teacher_sha256, user_attrs=t.attrs)


def describe_state(trial: FrozenTrial | TrialRecord) -> str:
    t = record(trial)
    if t.state == TrialState.PRUNED:
        # Where it stopped: its last report (a stage end, or a rung inside a stage).
        points = sorted(t.intermediate_values.items()) or t.stage_values
        ep = points[-1][0] if points else 0
        where = f" after {ep} epoch{'s' if ep != 1 else ''} at val acc {points[-1][1]:.4f}" if points else ""
        return f"PRUNED (stopped{where})"
    if t.state == TrialState.FAIL:
        return f"FAIL ({t.attrs.fail_reason if t.attrs.fail_reason is not None else 'no reason recorded'})"
    return t.state.name


# ------------------------------------------------------------------------------------- exporting
@dataclass
class Exported:
    rank: int | None  # None: exported by --trial
    trial: int
    path: Path
    sequence: str
    val_acc: float
    n_val: int | None
    baseline: str | None


def provenance(study: optuna.Study, db: Path, trial: FrozenTrial | TrialRecord, plan: Plan,
               rank: int | None) -> dict[str, Any]:
    t = record(trial)
    acc = t.values[0]
    n_val = t.n_val
    attrs = StudyAttrs.of(study)
    stages = t.stage_values
    confirmed = confirmations(study.get_trials(deepcopy=False)).get(t.number)
    return {
        "study": study.study_name,
        "study_db": str(Path(db).resolve()),
        "trial": t.number,
        "rank": rank,
        "val_acc": acc,
        "n_val": n_val,
        "val_acc_stderr": binomial_se(acc, n_val),
        "sequence": t.sequence if t.sequence is not None else plan.sequence(),
        # Per stage end: method, cumulative epochs, val accuracy (exact floats: `train` must match).
        "stages": [
            {"stage": i + 1, "method": plan.stages[i].method if i < len(plan.stages) else None,
             "cum_epochs": cum, "val_acc": v}
            for i, (cum, v) in enumerate(stages)
        ],
        "space_path": attrs.space_path,
        "space_sha256": attrs.space_sha256,
        "teacher_sha256": attrs.teacher_sha256 if attrs.teacher_sha256 is not None else plan.teacher_sha256,
        "teacher_path": attrs.teacher_path,
        "threads": t.attrs.threads,
        "baseline": t.attrs.baseline,
        # The plan's val accuracy on the confirmation seeds (what the ranking used), where confirmed.
        **({"confirmed_val_acc": confirmed.mean, "confirmed_seeds": confirmed.by_seed} if confirmed else {}),
    }


def _export_one(study: optuna.Study, db: Path, t: TrialRecord, path: Path, rank: int | None) -> Exported:
    plan = trial_plan(study, t)
    plan = plan.model_copy(update={
        "name": f"{study.study_name}-trial{t.number}",
        "provenance": provenance(study, db, t, plan, rank),
    })
    save_plan(plan, path)
    return Exported(rank, t.number, path, plan.sequence(), t.values[0], t.n_val, t.attrs.baseline)


def _drop_stale_ranks(out: Path, study: str, keep: int) -> None:
    """Remove rankN.yaml (N > keep) left by an earlier, longer export of the same study."""
    for p in out.glob("rank*.yaml"):
        n = p.stem[4:]
        if not n.isdigit() or int(n) <= keep:
            continue
        try:
            prov = (yaml.safe_load(p.read_text()) or {}).get("provenance") or {}
        except yaml.YAMLError:
            continue
        if prov.get("study") == study:
            p.unlink()


def export_plans(studies_dir: str | Path, study: str, *, top: int = DEFAULT_TOP, out: str | Path | None = None,
                 trial: int | None = None) -> list[Exported]:
    """Write ``rank1.yaml .. rankK.yaml`` (or ``trialN.yaml`` for ``trial``) and return what was written.

    Only COMPLETE trials are exported; a study without one, or a ``trial`` that did not complete,
    is a UserError that says why.
    """
    db = find_study_db(studies_dir, study)
    st = open_study(db)
    out_dir = Path(out) if out is not None else Path(studies_dir) / st.study_name / "plans"
    trials = records(st.get_trials(deepcopy=False))
    if trial is not None:
        chosen = next((t for t in trials if t.number == trial), None)
        if chosen is None:
            raise UserError(f"--trial {trial}: study {st.study_name} has no trial {trial} "
                            f"(trials 0..{len(trials) - 1})")
        if chosen.state != TrialState.COMPLETE or not chosen.values:
            raise UserError(f"--trial {trial}: trial {trial} of study {st.study_name} is {describe_state(chosen)}; "
                            "only completed trials are exported")
        return [_export_one(st, db, chosen, out_dir / f"trial{trial}.yaml", None)]
    if top < 1:
        raise UserError(f"--top must be >= 1 (got {top})")
    ranked = ranked_trials(st)
    if not ranked:
        counts = {s.name: sum(1 for t in trials if t.state == s) for s in TrialState}
        seen = ", ".join(f"{n} {k.lower()}" for k, n in counts.items() if n) or "no trials"
        raise UserError(f"study {st.study_name} has no completed trial to export ({seen}); "
                        "pruned and failed trials are never exported")
    written = [_export_one(st, db, t, out_dir / f"rank{i}.yaml", i) for i, t in enumerate(ranked[:top], start=1)]
    _drop_stale_ranks(out_dir, st.study_name, len(written))
    return written


__all__ = [
    "DEFAULT_TOP",
    "Exported",
    "describe_state",
    "existing_studies",
    "export_plans",
    "find_study_db",
    "open_study",
    "ranked_trials",
    "readonly_storage",
    "stage_values",
    "trial_n_val",
    "trial_plan",
    "val_acc",
]
