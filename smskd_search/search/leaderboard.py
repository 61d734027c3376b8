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
from smskd_search.search.sampling import BASELINE_ATTR
from smskd_search.space import LoadedSpace


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


def leaderboard(study: optuna.Study, trials: list[FrozenTrial], multi: bool) -> list[LeaderboardRow]:
    """Completed trials, best first (the Pareto front first in an accuracy-vs-cost study)."""
    done = [t for t in trials if t.state == TrialState.COMPLETE and t.values]
    front: set[int] = set()
    if multi:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            front = {t.number for t in study.best_trials}
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


def write_best_plan(trial: FrozenTrial, path: Path, study: str, space: LoadedSpace) -> Path | None:
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
        },
    })
    return save_plan(plan, path)


__all__ = ["LeaderboardRow", "leaderboard", "write_best_plan"]
