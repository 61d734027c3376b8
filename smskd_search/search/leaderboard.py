"""The study's ranking: completed trials as leaderboard rows, and the best plan written as YAML.

Data only; the text of a leaderboard is :mod:`smskd_search.summary_text`, beside the CLI.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import optuna
from optuna.trial import FrozenTrial, TrialState

from smskd_search.plan import Plan, save_plan
from smskd_search.search.record import Confirmed, TrialRecord, confirmations, record, records
from smskd_search.space import LoadedSpace


@dataclass
class LeaderboardRow:
    """One distinct completed plan: its single-seed value and, where confirmed, its fresh seeds'."""

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
    confirmed: Confirmed | None = None  # val accuracy on the confirmation seeds
    # Paired difference to the best confirmed baseline (mean, s.e., seeds) and that baseline's label.
    vs_baseline: tuple[float, float | None, int] | None = None
    vs_baseline_label: str | None = None


def _reference_fields(plan: Plan | None) -> tuple[float | None, str | None, str | None]:
    """lambda_ref, weight mode and normalisation where a reference term acts (2+ stages)."""
    if plan is None or len(plan.stages) < 2:
        return None, None, None
    ref = plan.reference
    if ref.weight_mode == "none":
        return None, ref.weight_mode, None
    return ref.lambda_ref, ref.weight_mode, ref.normalize


def plan_key(t: FrozenTrial | TrialRecord) -> str | None:
    """The trial's :meth:`Plan.canonical_hash` (see :attr:`TrialRecord.plan_key`)."""
    return record(t).plan_key


def _distinct(ranked: list[TrialRecord]) -> list[TrialRecord]:
    """A plan once: repeats answered from the study, and plans trained twice (two trials that
    wanted it at once), stand behind their first place."""
    out, seen = [], set()
    for t in ranked:
        key = t.plan_key
        if t.is_repeat or (key is not None and key in seen):
            continue
        if key is not None:
            seen.add(key)
        out.append(t)
    return out


def _searched(trials: Iterable[FrozenTrial | TrialRecord]) -> list[TrialRecord]:
    return [t for t in records(trials) if t.state == TrialState.COMPLETE and t.values and not t.is_confirmation]


def _value(t: TrialRecord) -> float:
    return t.values[0]


def rank_by_single_seed(trials: Iterable[FrozenTrial | TrialRecord]) -> list[TrialRecord]:
    """Distinct completed plans by their own (single-seed) value; what confirmation picks from."""
    return _distinct(sorted(_searched(trials), key=lambda t: (-_value(t), _epochs(t), t.number)))


def rank_trials(trials: Iterable[FrozenTrial | TrialRecord]) -> list[TrialRecord]:
    """The study's one ranking (leaderboard, ``best.yaml``, ``export``, report).

    Distinct completed plans (no repeats, no confirmation runs): the confirmed ones first, by their
    mean over the confirmation seeds, then the rest by their single-seed value; ties go to fewer
    total epochs, then to the earlier trial.
    """
    recs = records(trials)
    conf = confirmations(recs)

    def key(t: TrialRecord) -> tuple:
        c = conf.get(t.number)
        return (c is None, -(c.mean if c is not None else _value(t)), _epochs(t), t.number)

    return _distinct(sorted(_searched(recs), key=key))


def _epochs(t: TrialRecord) -> int:
    return t.total_epochs or 0


def _ranked_for_board(study: optuna.Study, recs: list[TrialRecord], multi: bool) -> tuple[list[TrialRecord], set[int]]:
    """The rows' order, and the Pareto front (empty unless ``multi``)."""
    if not multi:
        return rank_trials(recs), set()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        front = {t.number for t in study.best_trials}
    return _distinct(sorted(_searched(recs), key=lambda t: (
        t.number not in front, -t.values[0], t.values[1] if len(t.values) > 1 else 0, t.number))), front


def leaderboard(study: optuna.Study, trials: Iterable[FrozenTrial | TrialRecord], multi: bool) -> list[LeaderboardRow]:
    """Distinct completed plans in the study's ranking (:func:`rank_trials`); in an accuracy-vs-cost
    study the Pareto front first (a cheaper plan is only better if it is not dominated)."""
    recs = records(trials)
    done, front = _ranked_for_board(study, recs, multi)
    conf = confirmations(recs)
    confirmed_baselines = [t for t in done if t.baseline and t.number in conf]
    rival = max(confirmed_baselines, key=lambda t: conf[t.number].mean, default=None)
    rows: list[LeaderboardRow] = []
    for rank, t in enumerate(done, start=1):
        lam, mode, norm = _reference_fields(t.plan)
        c = conf.get(t.number)
        vs = c.paired_difference(conf[rival.number]) if (c is not None and rival is not None and rival.number != t.number) else None
        rows.append(LeaderboardRow(
            rank=rank, number=t.number, sequence=t.sequence or "?", lambda_ref=lam,
            weight_mode=mode, normalize=norm, val_acc=_value(t), n_val=t.n_val,
            total_epochs=t.total_epochs if t.total_epochs is not None else (t.plan.total_epochs if t.plan else None),
            baseline=t.baseline, pareto=multi and t.number in front, confirmed=c, vs_baseline=vs,
            vs_baseline_label=rival.baseline if vs is not None and rival is not None else None,
        ))
    return rows


def write_best_plan(trial: FrozenTrial | TrialRecord, path: Path, study: str, space: LoadedSpace,
                    confirmed: Confirmed | None = None) -> Path | None:
    """The trial's plan as ``path`` (YAML), named ``<study>-best``, with its provenance."""
    t = record(trial)
    if t.plan is None:
        return None
    plan = t.plan.model_copy(update={
        "name": f"{study}-best",
        "provenance": {
            "study": study, "trial": t.number, "val_acc": t.value,
            "n_val": t.n_val, "threads": t.attrs.threads,
            "space_sha256": space.sha256,
            "space_path": str(Path(space.path).resolve()),
            **({"confirmed_val_acc": confirmed.mean, "confirmed_seeds": list(confirmed.by_seed)}
               if confirmed is not None else {}),
        },
    })
    return save_plan(plan, path)


__all__ = ["LeaderboardRow", "leaderboard", "plan_key", "rank_by_single_seed", "rank_trials", "write_best_plan"]
