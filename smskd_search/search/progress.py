"""Progress of a running search: :class:`ProgressInfo` snapshots, counted from Tune's own trials."""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from optuna.trial import FrozenTrial, TrialState

from smskd_search.search.record import TrialRecord, records
from smskd_search.search.trial_report import TrialReport

logger = logging.getLogger(__name__)


@dataclass
class ProgressInfo:
    """One snapshot of a running search, for a live progress line."""

    study: str
    budget: int
    done: int  # finished trials that count toward the budget (this run and earlier ones)
    complete: int
    pruned: int
    failed: int
    running: int
    best_value: float | None
    best_sequence: str | None
    elapsed_s: float
    phase: str = "search"  # "search" (the budget) or "confirm" (the confirmation runs after it)
    repeats: int = 0  # repeats of finished plans answered from the study in this run (off the budget)
    # Confirmation runs that started in the budget's Tune run while its last trials ran.
    confirm_done: int = 0
    confirm_running: int = 0


def counts_by_kind(trials: list[FrozenTrial] | list[TrialRecord]) -> tuple[int, int, int]:
    """(complete, pruned, failed) trials of the budget; trials the search cut short are not failures."""
    searched = [t for t in records(trials) if t.phase == "search"]
    complete = sum(1 for t in searched if t.state == TrialState.COMPLETE)
    pruned = sum(1 for t in searched if t.state == TrialState.PRUNED)
    failed = sum(1 for t in searched if t.state == TrialState.FAIL and not t.interrupted and not t.infrastructure)
    return complete, pruned, failed


def best_of(trials: list[FrozenTrial] | list[TrialRecord]) -> tuple[float | None, str | None]:
    done = [t for t in records(trials) if t.state == TrialState.COMPLETE and t.values]
    if not done:
        return None, None
    best = max(done, key=lambda t: t.values[0])
    return best.values[0], best.sequence


@dataclass
class _Tally:
    """The ended trials of a Tune run, counted as the progress line shows them."""

    complete: int
    pruned: int
    failed: int
    best_value: float | None
    best_sequence: str | None
    confirm_done: int = 0  # confirmation runs of a search run (counted apart)
    confirm_failed: int = 0

    def add(self, r: TrialReport | None, confirmation: bool, sequence: str | None) -> None:
        if confirmation:
            # A run the infrastructure failed is run again later: not counted as done.
            infrastructure = r is not None and r.error is not None and r.infrastructure
            self.confirm_done += 0 if infrastructure else 1
            self.confirm_failed += 1 if r is None or (r.error is not None and not infrastructure) else 0
        elif r is not None and r.error:
            # An infrastructure failure is retried, not a failed plan: the next attempt counts.
            self.failed += 0 if r.infrastructure else 1
        elif r is not None and r.final:
            self.complete += 1
            if not math.isnan(r.val_acc) and (self.best_value is None or r.val_acc > self.best_value):
                self.best_value, self.best_sequence = r.val_acc, sequence
        elif r is not None:
            self.pruned += 1


def progress_callback(emit: Callable[[ProgressInfo], None], study: str, budget: int,
                      before: list[FrozenTrial], start: float, answered: Callable[[], int] = lambda: 0,
                      phase: str = "search", confirm_runs: Callable[[], int] = lambda: 0,
                      budget_handed_out: Callable[[], bool] = lambda: True) -> Any:
    """A Tune callback that sends a :class:`ProgressInfo` whenever the counts change (at most 1/s
    otherwise); no database reads while trials run. ``answered``: trials the searcher answered
    from the study without Tune (repeated plans), shown apart: they do not count toward the budget.
    ``confirm_runs``: in a ``search`` run, the confirmation runs enqueued in it so far; they are
    counted apart, and once no budget trial is left (``budget_handed_out`` and none unfinished) the
    snapshots are of the ``confirm`` phase."""
    from smskd_search.search._ray import tune

    def confirming(trial: Any) -> bool:
        return phase == "search" and bool(trial.config.get("confirmation"))

    class _Progress(tune.Callback):
        def __init__(self) -> None:
            self.tally = _Tally(*counts_by_kind(before), *best_of(before))
            self.running, self.confirm_running = 0, 0
            self.budget_open = True  # a budget trial has not ended yet (pending, running or paused)
            self._last = 0.0
            self._seen: set[str] = set()

        def _info(self) -> ProgressInfo:
            t, elapsed = self.tally, time.monotonic() - start
            if confirm_runs() and not self.budget_open and budget_handed_out():
                return ProgressInfo(study, confirm_runs(), t.confirm_done, t.confirm_done - t.confirm_failed, 0,
                                    t.confirm_failed, self.confirm_running, t.best_value, t.best_sequence, elapsed,
                                    "confirm", answered())
            return ProgressInfo(study, budget, t.complete + t.pruned + t.failed, t.complete, t.pruned, t.failed,
                                self.running, t.best_value, t.best_sequence, elapsed, phase, answered(),
                                t.confirm_done, self.confirm_running)

        def _send(self, force: bool = False) -> None:
            now = time.monotonic()
            if force or now - self._last >= 1.0:
                self._last = now
                try:
                    emit(self._info())
                except Exception:  # noqa: BLE001 - a display problem must not stop the search
                    logger.debug("progress callback failed", exc_info=True)

        def _count_running(self, trials: list, ended: Any = None) -> None:
            # Tune calls the trial hooks before it changes the ended trial's status.
            running = [t for t in trials if t.status == "RUNNING" and t is not ended]
            self.confirm_running = sum(1 for t in running if confirming(t))
            self.running = len(running) - self.confirm_running
            self.budget_open = any(t.status not in ("TERMINATED", "ERROR") and t is not ended and not confirming(t)
                                   for t in trials)

        def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
            if trial.trial_id in self._seen:
                return
            self._seen.add(trial.trial_id)
            self._count_running(trials, trial)
            self.tally.add(TrialReport.from_dict(trial.last_result), confirming(trial), trial.config.get("sequence"))
            self._send(force=True)

        def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
            # A worker Tune gave up on (a lost node or actor) is an infrastructure failure: retried.
            if trial.trial_id not in self._seen:
                self._seen.add(trial.trial_id)
                self._count_running(trials, trial)
                self._send(force=True)

        def on_step_end(self, iteration: int, trials: list, **info: Any) -> None:
            before = (self.running, self.confirm_running)
            self._count_running(trials)
            self._send(force=(self.running, self.confirm_running) != before)

    return _Progress()


__all__ = ["ProgressInfo", "best_of", "counts_by_kind", "progress_callback"]
