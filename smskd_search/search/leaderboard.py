"""The study's ranking: completed trials as leaderboard rows, and the best plan written as YAML.

Data only; the text of a leaderboard is :mod:`smskd_search.summary_text`, beside the CLI.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path

import optuna
import yaml
from optuna.trial import FrozenTrial, TrialState

from smskd_search.plan import parse_plan, save_plan
from smskd_search.search import storage as st
from smskd_search.search.confirm import Confirmed, confirmations, is_confirmation
from smskd_search.search.sampling import BASELINE_ATTR
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


def plan_key(t: FrozenTrial) -> str | None:
    """The trial's :meth:`Plan.canonical_hash` (computed from its plan in studies made before the
    attribute existed); None without a plan."""
    key = t.user_attrs.get(st.ATTR_PLAN_KEY)
    if key is None and t.user_attrs.get(st.ATTR_PLAN):
        key = parse_plan(yaml.safe_load(t.user_attrs[st.ATTR_PLAN]), source=f"trial {t.number} plan").canonical_hash()
    return key


def _distinct(ranked: list[FrozenTrial]) -> list[FrozenTrial]:
    """A plan once: repeats answered from the study, and plans trained twice (two trials that
    wanted it at once), stand behind their first place."""
    out, seen = [], set()
    for t in ranked:
        key = plan_key(t)
        if st.is_repeat(t) or (key is not None and key in seen):
            continue
        if key is not None:
            seen.add(key)
        out.append(t)
    return out


def _searched(trials: list[FrozenTrial]) -> list[FrozenTrial]:
    return [t for t in trials if t.state == TrialState.COMPLETE and t.values and not is_confirmation(t)]


def rank_by_single_seed(trials: list[FrozenTrial]) -> list[FrozenTrial]:
    """Distinct completed plans by their own (single-seed) value; what confirmation picks from."""
    return _distinct(sorted(_searched(trials), key=lambda t: (-float(t.values[0]), _epochs(t), t.number)))


def rank_trials(trials: list[FrozenTrial]) -> list[FrozenTrial]:
    """The study's one ranking (leaderboard, ``best.yaml``, ``export``, report).

    Distinct completed plans (no repeats, no confirmation runs): the confirmed ones first, by their
    mean over the confirmation seeds, then the rest by their single-seed value; ties go to fewer
    total epochs, then to the earlier trial.
    """
    conf = confirmations(trials)

    def key(t: FrozenTrial) -> tuple:
        c = conf.get(t.number)
        return (c is None, -(c.mean if c is not None else float(t.values[0])), _epochs(t), t.number)

    return _distinct(sorted(_searched(trials), key=key))


def _epochs(t: FrozenTrial) -> int:
    return int(t.user_attrs.get(st.ATTR_TOTAL_EPOCHS) or 0)


def leaderboard(study: optuna.Study, trials: list[FrozenTrial], multi: bool) -> list[LeaderboardRow]:
    """Distinct completed plans in the study's ranking (:func:`rank_trials`); in an accuracy-vs-cost
    study the Pareto front first (a cheaper plan is only better if it is not dominated)."""
    if multi:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            front = {t.number for t in study.best_trials}
        done = _distinct(sorted(_searched(trials), key=lambda t: (
            t.number not in front, -t.values[0], t.values[1] if len(t.values) > 1 else 0, t.number)))
    else:
        front = set()
        done = rank_trials(trials)
    conf = confirmations(trials)
    confirmed_baselines = [t for t in done if t.user_attrs.get(BASELINE_ATTR) and t.number in conf]
    rival = max(confirmed_baselines, key=lambda t: conf[t.number].mean, default=None)
    rows: list[LeaderboardRow] = []
    for rank, t in enumerate(done, start=1):
        lam, mode, norm, total = _reference_fields(t.user_attrs.get(st.ATTR_PLAN))
        c = conf.get(t.number)
        vs = c.paired_difference(conf[rival.number]) if (c is not None and rival is not None and rival is not t) else None
        rows.append(LeaderboardRow(
            rank=rank, number=t.number, sequence=t.user_attrs.get(st.ATTR_SEQUENCE, "?"), lambda_ref=lam,
            weight_mode=mode, normalize=norm, val_acc=float(t.values[0]), n_val=t.user_attrs.get(st.ATTR_N_VAL),
            total_epochs=t.user_attrs.get(st.ATTR_TOTAL_EPOCHS, total), baseline=t.user_attrs.get(BASELINE_ATTR),
            pareto=multi and t.number in front, confirmed=c, vs_baseline=vs,
            vs_baseline_label=rival.user_attrs.get(BASELINE_ATTR) if vs is not None and rival is not None else None,
        ))
    return rows


def write_best_plan(trial: FrozenTrial, path: Path, study: str, space: LoadedSpace,
                    confirmed: Confirmed | None = None) -> Path | None:
    """The trial's plan as ``path`` (YAML), named ``<study>-best``, with its provenance."""
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
            "space_path": str(Path(space.path).resolve()),
            **({"confirmed_val_acc": confirmed.mean, "confirmed_seeds": list(confirmed.by_seed)}
               if confirmed is not None else {}),
        },
    })
    return save_plan(plan, path)


__all__ = ["LeaderboardRow", "leaderboard", "plan_key", "rank_by_single_seed", "rank_trials", "write_best_plan"]
