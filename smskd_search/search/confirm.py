"""Confirmation after the budget: the best distinct plans and baselines re-run on fresh seeds.

One seed per trial on a few hundred validation images crowns noise (the winner's curse: the best
of 50 noisy values is biased up). After the budget, the top ``k`` distinct plans and the best
``baselines`` baselines are trained again on the same ``seeds`` fresh seeds each (student
initialisation and batch order; the split stays fixed), as trials of the study that carry
``confirm_of`` (the trial they confirm) and ``confirm_seed``. They do not count toward the budget.
A plan's confirmed value is its mean over those seeds (the selecting run is left out: it is the
biased one); differences to the best baseline are paired by seed.
"""

from __future__ import annotations

from dataclasses import dataclass

import yaml
from optuna.trial import FrozenTrial, TrialState

from smskd_search.search import storage as st
from smskd_search.search.lifecycle import StudySession
from smskd_search.search.sampling import BASELINE_ATTR, FIXED_PLAN_ATTR
from smskd_search.search_settings import ConfirmSettings
from smskd_search.stats import mean_se
from smskd_search.validate import parse_plan

# Confirmation seeds start here (plus the space's seed): far from the seeds a search trains with.
SEED_OFFSET = 1000


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


def is_confirmation(t: FrozenTrial) -> bool:
    return t.user_attrs.get(st.ATTR_CONFIRM_OF) is not None


def confirmations(trials: list[FrozenTrial]) -> dict[int, Confirmed]:
    """The COMPLETE confirmation runs of the study, by the trial they confirm."""
    by: dict[int, dict[int, float]] = {}
    for t in trials:
        if is_confirmation(t) and t.state == TrialState.COMPLETE and t.values:
            by.setdefault(int(t.user_attrs[st.ATTR_CONFIRM_OF]), {})[int(t.user_attrs[st.ATTR_CONFIRM_SEED])] = \
                float(t.values[0])
    return {n: Confirmed(n, dict(sorted(v.items()))) for n, v in by.items()}


def seeds_for(space_seed: int, settings: ConfirmSettings) -> list[int]:
    return [space_seed + SEED_OFFSET + i for i in range(settings.seeds)]


def candidates(ranked: list[FrozenTrial], settings: ConfirmSettings) -> list[FrozenTrial]:
    """The trials to confirm, from the distinct completed trials ranked by single-seed value."""
    plans = [t for t in ranked if not t.user_attrs.get(BASELINE_ATTR)][: settings.plans]
    baselines = [t for t in ranked if t.user_attrs.get(BASELINE_ATTR)][: settings.baselines]
    return plans + baselines


def _done_pairs(trials: list[FrozenTrial], waiting: bool) -> set[tuple[int, int]]:
    """(confirmed trial, seed) of the confirmation runs finished for good (and waiting ones if asked)."""
    return {(int(t.user_attrs[st.ATTR_CONFIRM_OF]), int(t.user_attrs[st.ATTR_CONFIRM_SEED]))
            for t in trials if is_confirmation(t)
            and ((waiting and t.state == TrialState.WAITING) or st.finished_for_good(t))}


def missing(trials: list[FrozenTrial], ranked: list[FrozenTrial], space_seed: int, settings: ConfirmSettings) -> int:
    """Confirmation runs the study still lacks (cut short by a stop, or never started)."""
    have = _done_pairs(trials, waiting=False)
    return sum(1 for c in candidates(ranked, settings) for s in seeds_for(space_seed, settings)
               if (c.number, s) not in have)


def enqueue(session: StudySession, ranked: list[FrozenTrial], space_seed: int, settings: ConfirmSettings) -> int:
    """Enqueue the confirmation runs the study lacks; returns how many runs are waiting now.

    A run already finished (COMPLETE, PRUNED or failed for good) is not repeated; one the search
    cut short is enqueued again.
    """
    trials = session.trials()
    have = _done_pairs(trials, waiting=True)
    waiting = sum(1 for t in trials if is_confirmation(t) and t.state == TrialState.WAITING)
    for cand in candidates(ranked, settings):
        plan = parse_plan(yaml.safe_load(cand.user_attrs[st.ATTR_PLAN]), source=f"trial {cand.number} plan")
        for seed in seeds_for(space_seed, settings):
            if (cand.number, seed) in have:
                continue
            fixed = plan.model_copy(update={"seed": seed, "name": f"{session.name}-confirm{cand.number}-seed{seed}"})
            attrs = {FIXED_PLAN_ATTR: fixed.to_yaml(), st.ATTR_CONFIRM_OF: cand.number, st.ATTR_CONFIRM_SEED: seed}
            session.study.enqueue_trial({}, user_attrs=attrs)
            waiting += 1
    return waiting


__all__ = ["ConfirmSettings", "Confirmed", "SEED_OFFSET", "candidates", "confirmations", "enqueue", "is_confirmation",
           "missing", "seeds_for"]
