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

from collections.abc import Iterable

from optuna.trial import FrozenTrial, TrialState

from smskd_search.search.lifecycle import StudySession
from smskd_search.search.record import Confirmed, TrialAttrs, TrialRecord, confirmations, record, records
from smskd_search.search_settings import ConfirmSettings

# Confirmation seeds start here (plus the space's seed): far from the seeds a search trains with.
SEED_OFFSET = 1000


def is_confirmation(t: FrozenTrial | TrialRecord) -> bool:
    return record(t).is_confirmation


def seeds_for(space_seed: int, settings: ConfirmSettings) -> list[int]:
    return [space_seed + SEED_OFFSET + i for i in range(settings.seeds)]


def candidates(ranked: Iterable[FrozenTrial | TrialRecord], settings: ConfirmSettings) -> list[TrialRecord]:
    """The trials to confirm, from the distinct completed trials ranked by single-seed value."""
    recs = records(ranked)
    plans = [t for t in recs if not t.baseline][: settings.plans]
    baselines = [t for t in recs if t.baseline][: settings.baselines]
    return plans + baselines


def _done_pairs(trials: Iterable[FrozenTrial | TrialRecord], waiting: bool) -> set[tuple[int, int]]:
    """(confirmed trial, seed) of the confirmation runs finished for good (and waiting ones if asked)."""
    return {(t.attrs.confirm_of, t.attrs.confirm_seed) for t in records(trials)
            if t.attrs.confirm_of is not None and t.attrs.confirm_seed is not None
            and ((waiting and t.state == TrialState.WAITING) or t.finished_for_good)}


def missing(trials: Iterable[FrozenTrial | TrialRecord], ranked: Iterable[FrozenTrial | TrialRecord],
            space_seed: int, settings: ConfirmSettings) -> int:
    """Confirmation runs the study still lacks (cut short by a stop, or never started)."""
    have = _done_pairs(trials, waiting=False)
    return sum(1 for c in candidates(ranked, settings) for s in seeds_for(space_seed, settings)
               if (c.number, s) not in have)


def enqueue(session: StudySession, ranked: Iterable[FrozenTrial | TrialRecord], space_seed: int,
            settings: ConfirmSettings) -> int:
    """Enqueue the confirmation runs the study lacks; returns how many runs are waiting now.

    A run already finished (COMPLETE, PRUNED or failed for good) is not repeated; one the search
    cut short is enqueued again.
    """
    trials = records(session.trials())
    have = _done_pairs(trials, waiting=True)
    waiting = sum(1 for t in trials if t.is_confirmation and t.state == TrialState.WAITING)
    for cand in candidates(ranked, settings):
        plan = cand.plan
        if plan is None:
            raise ValueError(f"trial {cand.number} has no stored plan to confirm")
        for seed in seeds_for(space_seed, settings):
            if (cand.number, seed) in have:
                continue
            fixed = plan.model_copy(update={"seed": seed, "name": f"{session.name}-confirm{cand.number}-seed{seed}"})
            attrs = TrialAttrs(fixed_plan=fixed.to_yaml(), confirm_of=cand.number, confirm_seed=seed)
            session.study.enqueue_trial({}, user_attrs=attrs.stored())
            waiting += 1
    return waiting


__all__ = ["ConfirmSettings", "Confirmed", "SEED_OFFSET", "candidates", "confirmations", "enqueue", "is_confirmation",
           "missing", "seeds_for"]
