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


def progress_callback(emit: Callable[[ProgressInfo], None], study: str, budget: int,
                      before: list[FrozenTrial], start: float, answered: Callable[[], int] = lambda: 0,
                      phase: str = "search") -> Any:
    """A Tune callback that sends a :class:`ProgressInfo` whenever the counts change (at most 1/s
    otherwise); no database reads while trials run. ``answered``: trials the searcher answered
    from the study without Tune (repeated plans), shown apart: they do not count toward the budget."""
    from smskd_search.search._ray import tune

    class _Progress(tune.Callback):
        def __init__(self) -> None:
            self.complete, self.pruned, self.failed = counts_by_kind(before)
            self.best_value, self.best_sequence = best_of(before)
            self.running = 0
            self._last = 0.0
            self._seen: set[str] = set()

        def _info(self) -> ProgressInfo:
            return ProgressInfo(study, budget, self.complete + self.pruned + self.failed,
                                self.complete, self.pruned, self.failed, self.running, self.best_value,
                                self.best_sequence, time.monotonic() - start, phase, answered())

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
            self.running = sum(1 for t in trials if t.status == "RUNNING" and t is not ended)

        def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
            if trial.trial_id in self._seen:
                return
            self._seen.add(trial.trial_id)
            self._count_running(trials, trial)
            r = TrialReport.from_dict(trial.last_result)
            if r is not None and r.error:
                # An infrastructure failure is retried, not a failed plan: the next attempt counts.
                self.failed += 0 if r.infrastructure else 1
            elif r is not None and r.final:
                self.complete += 1
                if not math.isnan(r.val_acc) and (self.best_value is None or r.val_acc > self.best_value):
                    self.best_value = r.val_acc
                    self.best_sequence = trial.config.get("sequence")
            elif r is not None:
                self.pruned += 1
            self._send(force=True)

        def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
            # A worker Tune gave up on (a lost node or actor) is an infrastructure failure: retried.
            if trial.trial_id not in self._seen:
                self._seen.add(trial.trial_id)
                self._count_running(trials, trial)
                self._send(force=True)

        def on_step_end(self, iteration: int, trials: list, **info: Any) -> None:
            before_running = self.running
            self._count_running(trials)
            self._send(force=self.running != before_running)

    return _Progress()


__all__ = ["ProgressInfo", "best_of", "counts_by_kind", "progress_callback"]
