"""Confirmation after the budget: the best distinct plans and baselines re-run on fresh seeds.

One seed per trial on a few hundred validation images crowns noise (the winner's curse: the best
of 50 noisy values is biased up). After the budget, the top ``k`` distinct plans and the best
``baselines`` baselines are trained again on the same ``seeds`` fresh seeds each (student
initialisation and batch order; the split stays fixed), as trials of the study that carry
``confirm_of`` (the trial they confirm) and ``confirm_seed``. They do not count toward the budget.
A plan's confirmed value is its mean over those seeds (the selecting run is left out: it is the
biased one); differences to the best baseline are paired by seed.

The runs need not wait for the budget's last trial: once the searcher has handed out its last
budget trial, a candidate whose place no trial still to finish can take is :func:`settled`, and
its runs go to the workers the budget's last trials free (data and teacher loaded there).
"""

from __future__ import annotations

from collections.abc import Iterable

from optuna.trial import FrozenTrial, TrialState

from smskd_search.search.leaderboard import rank_by_single_seed
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


def _done_pairs(trials: Iterable[FrozenTrial | TrialRecord], pending: bool) -> set[tuple[int, int]]:
    """(confirmed trial, seed) of the confirmation runs finished for good (and, if asked, those
    waiting or running)."""
    return {(t.attrs.confirm_of, t.attrs.confirm_seed) for t in records(trials)
            if t.attrs.confirm_of is not None and t.attrs.confirm_seed is not None
            and ((pending and t.state in (TrialState.WAITING, TrialState.RUNNING)) or t.finished_for_good)}


def missing(trials: Iterable[FrozenTrial | TrialRecord], ranked: Iterable[FrozenTrial | TrialRecord],
            space_seed: int, settings: ConfirmSettings) -> int:
    """Confirmation runs the study still lacks (cut short by a stop, or never started)."""
    have = _done_pairs(trials, pending=False)
    return sum(1 for c in candidates(ranked, settings) for s in seeds_for(space_seed, settings)
               if (c.number, s) not in have)


def _contenders(trials: list[TrialRecord]) -> list[TrialRecord]:
    """Budget trials that may still end COMPLETE, or whose rerun may: running, waiting, or cut short
    (interrupted, or failed through the infrastructure) without a rerun yet."""
    rerun = {t.attrs.retry_of for t in trials if t.attrs.retry_of is not None}
    return [t for t in trials if not t.is_confirmation and not t.is_repeat
            and (t.state in (TrialState.RUNNING, TrialState.WAITING)
                 or (t.state == TrialState.FAIL and not t.finished_for_good and t.number not in rerun))]


def settled(trials: Iterable[FrozenTrial | TrialRecord], settings: ConfirmSettings) -> list[TrialRecord]:
    """The candidates no trial still to finish can displace: confirmed now, they are confirmed anyway.

    Valid once no new budget trial will be asked beyond the :func:`_contenders` (each may end
    COMPLETE, or be rerun, once): a candidate at place ``i`` among its kind (plans or baselines) is
    settled where ``i`` plus the contenders of its kind stays below the kind's count to confirm, and
    no contender could turn out to be its plan (a plan's first place goes to its best trial). With no
    contender left, the settled candidates are :func:`candidates` of the final ranking.

    Example:

        >>> from optuna.trial import create_trial
        >>> from smskd_search.search.leaderboard import rank_by_single_seed
        >>> done = [create_trial(value=v, user_attrs={"plan_key": k}) for v, k in ((0.9, "a"), (0.8, "b"))]
        >>> running = create_trial(state=TrialState.RUNNING, user_attrs={"plan_key": "c"})
        >>> [t.plan_key for t in settled([*done, running], ConfirmSettings(plans=2, baselines=0, seeds=1))]
        ['a']
    """
    recs = records(trials)
    open_ = _contenders(recs)
    ranked = rank_by_single_seed(recs)
    out = []
    for is_baseline, k in ((False, settings.plans), (True, settings.baselines)):
        rivals = [t for t in open_ if bool(t.baseline) == is_baseline]
        keys = {t.plan_key for t in rivals}
        if None in keys:
            continue  # a contender whose plan is not known yet could be any of them
        kind = [t for t in ranked if bool(t.baseline) == is_baseline][:k]
        out += [t for i, t in enumerate(kind) if i + len(rivals) < k and t.plan_key not in keys]
    return out


def enqueue(session: StudySession, ranked: Iterable[FrozenTrial | TrialRecord], space_seed: int,
            settings: ConfirmSettings) -> int:
    """Enqueue the confirmation runs the study lacks; returns how many runs are waiting now.

    A run already finished (COMPLETE, PRUNED or failed for good) is not repeated; one the search
    cut short is enqueued again.
    """
    trials = records(session.trials())
    return waiting(trials) + _enqueue_runs(session, trials, candidates(ranked, settings), space_seed, settings)


def enqueue_settled(session: StudySession, space_seed: int, settings: ConfirmSettings) -> int:
    """Enqueue the runs of the :func:`settled` candidates the study lacks; returns how many it enqueued."""
    trials = records(session.trials())
    return _enqueue_runs(session, trials, settled(trials, settings), space_seed, settings)


def waiting(trials: Iterable[FrozenTrial | TrialRecord]) -> int:
    """Confirmation runs enqueued in the study and not asked for yet."""
    return sum(1 for t in records(trials) if t.is_confirmation and t.state == TrialState.WAITING)


def _enqueue_runs(session: StudySession, trials: list[TrialRecord], cands: list[TrialRecord], space_seed: int,
                  settings: ConfirmSettings) -> int:
    """Enqueue the runs of ``cands`` that ``trials`` (the study's) hold neither finished for good nor
    waiting nor running; returns how many."""
    have = _done_pairs(trials, pending=True)
    enqueued = 0
    for cand in cands:
        plan = cand.plan
        if plan is None:
            raise ValueError(f"trial {cand.number} has no stored plan to confirm")
        for seed in seeds_for(space_seed, settings):
            if (cand.number, seed) in have:
                continue
            fixed = plan.model_copy(update={"seed": seed, "name": f"{session.name}-confirm{cand.number}-seed{seed}"})
            attrs = TrialAttrs(fixed_plan=fixed.to_yaml(), confirm_of=cand.number, confirm_seed=seed)
            session.study.enqueue_trial({}, user_attrs=attrs.stored())
            enqueued += 1
    return enqueued


__all__ = ["ConfirmSettings", "Confirmed", "SEED_OFFSET", "candidates", "confirmations", "enqueue", "enqueue_settled",
           "is_confirmation", "missing", "seeds_for", "settled", "waiting"]
