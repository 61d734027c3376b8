"""The Tune scheduler that prunes trials at stage ends by :class:`~smskd_search.search.pruning.StageRungs`.

Trials report at every stage end (``cum_epochs``, ``val_acc``, ``n_val``, ``final``, ``baseline``);
the scheduler answers STOP when the rung rule says so, except to a baseline, which is measured in
full (its values still count at the rungs). What it decided, and why, is kept per trial in
:attr:`StageASHAScheduler.decisions`, from which the searcher stores a pruned trial's reason in the
study.
"""

from __future__ import annotations

import pickle
from typing import Any

from smskd_search.search._ray import ray  # noqa: F401  (the environment before Ray's import)
from smskd_search.search.pruning import RungDecision, StageRungs
from ray.tune.schedulers import FIFOScheduler, TrialScheduler


class StageASHAScheduler(FIFOScheduler):
    """ASHA on cumulative epochs with a noise margin, deciding at stage ends (FIFO otherwise)."""

    def __init__(self, rungs: StageRungs, *, time_attr: str = "cum_epochs", metric: str = "val_acc",
                 n_attr: str = "n_val", final_attr: str = "final", exempt_attr: str = "baseline"):
        super().__init__()
        self.rungs = rungs
        self._time_attr, self._metric, self._n_attr, self._final_attr = time_attr, metric, n_attr, final_attr
        # Trials whose results carry this flag (the baselines) are recorded at the rungs, never stopped.
        self._exempt_attr = exempt_attr
        self.decisions: dict[str, list[RungDecision]] = {}

    def set_search_properties(self, metric: str | None, mode: str | None, **spec: Any) -> bool:
        # The metric is fixed (validation accuracy, maximised): accept only a matching request.
        return metric in (None, self._metric) and mode in (None, "max")

    def on_trial_result(self, tune_controller: Any, trial: Any, result: dict) -> str:
        if result.get("error") or self._time_attr not in result or self._metric not in result:
            return TrialScheduler.CONTINUE
        n = result.get(self._n_attr)
        # A NaN value (a failed plan's report) is no stage value: the rungs answer None to it.
        decision = self.rungs.report(trial.trial_id, result[self._time_attr], float(result[self._metric]),
                                     n=int(n) if n else None,
                                     final=bool(result.get(self._final_attr) or result.get(self._exempt_attr)))
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
