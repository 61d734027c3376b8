"""The Tune scheduler that prunes trials by :class:`~smskd_search.search.pruning.StageRungs`.

Trials report at every stage end and, where the space decides at the rungs, after exactly each
rung's cumulative epochs inside a stage (:class:`TrialReport`); the scheduler answers STOP when the
rung rule says so, except to a baseline, which is measured in full (its values still count at the
rungs), and to a confirmation run, which the rungs neither record nor stop. What it decided, and
why, is kept per trial in :attr:`StageASHAScheduler.decisions`, from which the searcher stores a
pruned trial's reason in the study.
"""

from __future__ import annotations

import pickle
from typing import Any

from smskd_search.search._ray import ray  # noqa: F401  (the environment before Ray's import)
from smskd_search.search.pruning import RungDecision, StageRungs
from smskd_search.search.trial_report import METRIC, TrialReport

from ray.tune.schedulers import FIFOScheduler, TrialScheduler


class StageASHAScheduler(FIFOScheduler):
    """ASHA on cumulative epochs with a noise margin (FIFO otherwise).

    Args:
        rungs: The rung rule and what it has recorded.
    """

    def __init__(self, rungs: StageRungs):
        super().__init__()
        self.rungs = rungs
        self.decisions: dict[str, list[RungDecision]] = {}

    def set_search_properties(self, metric: str | None, mode: str | None, **spec: Any) -> bool:
        # The metric is fixed (validation accuracy, maximised): accept only a matching request.
        return metric in (None, METRIC) and mode in (None, "max")

    def on_trial_result(self, tune_controller: Any, trial: Any, result: dict) -> str:
        r = TrialReport.from_dict(result)
        if r is None or not r.has_value or r.confirmation:
            # A failure report is no stage value; a confirmation run, another seed of a plan the
            # rungs have seen, would lift the bars the budget's last trials meet.
            return TrialScheduler.CONTINUE
        # Baselines are recorded at the rungs but never stopped, like a plan's last report.
        decision = self.rungs.report(trial.trial_id, r.cum_epochs, r.val_acc, n=r.n_val or None,
                                     final=r.final or r.baseline)
        if decision is None:
            return TrialScheduler.CONTINUE
        self.decisions.setdefault(trial.trial_id, []).append(decision)
        return TrialScheduler.STOP if decision.stop else TrialScheduler.CONTINUE

    def stop_reason(self, trial_id: str) -> str | None:
        """The decision that stopped this trial, in words (None if it was not stopped)."""
        stops = [d for d in self.decisions.get(trial_id, []) if d.stop]
        return stops[-1].describe() if stops else None

    def debug_string(self) -> str:
        return f"Stage ASHA (noise margin {self.rungs.noise_margin:g}): {self.rungs.describe()}"

    def save(self, checkpoint_path: str) -> None:
        with open(checkpoint_path, "wb") as f:
            pickle.dump({"rungs": self.rungs, "decisions": self.decisions}, f)

    def restore(self, checkpoint_path: str) -> None:
        with open(checkpoint_path, "rb") as f:
            state = pickle.load(f)
        self.rungs, self.decisions = state["rungs"], state["decisions"]


__all__ = ["StageASHAScheduler"]
