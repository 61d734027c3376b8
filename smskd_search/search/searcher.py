"""Ray Tune's ``OptunaSearch``, with the study states that a stage-pruned search needs.

Stock ``OptunaSearch`` (ray 2.60) does three things wrong for us:

1. A trial stopped by the scheduler reaches ``on_trial_complete`` with its last (partial) result and
   is told COMPLETE with that value; and Tune never passes the result that triggered the stop to
   ``on_trial_result`` (``tune_controller.py``: the search algorithm only sees results the
   scheduler let through). Here a trial is COMPLETE only when its result says ``final``; a stopped
   one is PRUNED, with the stopping result recorded first.
2. Intermediate values are keyed by Tune's report counter; here by cumulative epochs, the time
   axis the scheduler decides on.
3. After a hard kill the study database is ahead of any Tune snapshot, so telling a trial again
   raises ``UpdateFinishedTrialError``; that is expected and ignored here.

Trials left RUNNING when Tune stops (Ctrl-C, time budget) are not told anything by Tune;
:meth:`StageAwareOptunaSearch.fail_unfinished` marks them FAIL after ``fit()``.
"""

from __future__ import annotations

import logging
import math
import time
from typing import Any, Callable

import optuna
from optuna.exceptions import UpdateFinishedTrialError
from optuna.trial import TrialState

from smskd_search.search import storage as st
from smskd_search.search._ray import ray  # noqa: F401  (the environment before Ray's import)
from ray.tune.search.optuna import OptunaSearch

logger = logging.getLogger(__name__)

# Result keys the trainable reports.
VAL_ACC = "val_acc"
CUM_EPOCHS = "cum_epochs"
TOTAL_EPOCHS = "total_epochs"
FINAL = "final"
ERROR = "error"
N_VAL = "n_val"
REPLAYED = "replayed"
TRIAL_SECONDS = "trial_seconds"
TRIAL_STARTED_AT = "trial_started_at"
EPOCH_VAL_ACC = "epoch_val_acc"
STAGE_END = "stage_end"


class StageAwareOptunaSearch(OptunaSearch):
    """``OptunaSearch`` for stage-level reports: PRUNED states, epochs as steps, robust resume.

    ``metric``/``mode`` are ``"val_acc"``/``"max"``, or ``["val_acc", "total_epochs"]`` and
    ``["max", "min"]`` for the accuracy-vs-cost search (no intermediate values there: Optuna does
    not take them for multi-objective studies, and no pruning). ``pruning`` says whether a scheduler
    may stop trials: only then is a trial that ends before its last stage PRUNED. ``stop_reason``,
    the scheduler's account of a trial it stopped, is stored on the pruned trial; given, it also
    tells a pruned trial from one the search cut short (no reason: FAIL, interrupted).
    """

    def __init__(self, space: Any, *, metric: str | list[str], mode: str | list[str],
                 sampler: optuna.samplers.BaseSampler, study_name: str,
                 storage: optuna.storages.BaseStorage, pruning: bool = True,
                 stop_reason: Callable[[str], str | None] | None = None):
        super().__init__(space=space, metric=metric, mode=mode, sampler=sampler, study_name=study_name,
                         storage=storage)
        # Without a pruning scheduler an unfinished trial was cut short by the search, not pruned.
        self._pruning = pruning and not isinstance(metric, list)
        # The scheduler's account of why it stopped a trial (stored on the PRUNED trial).
        self._stop_reason = stop_reason
        self._reported: dict[str, set[int]] = {}
        self._stage_values: dict[str, dict[int, float]] = {}
        self._stage_times: dict[str, dict[int, float]] = {}
        self._epoch_values: dict[str, dict[int, float]] = {}

    @property
    def study(self) -> optuna.Study:
        return self._ot_study

    @property
    def multi_objective(self) -> bool:
        return isinstance(self.metric, list)

    def _record_stage(self, trial_id: str, result: dict) -> None:
        """One report: an intermediate value at its cumulative epochs; stage ends also as attrs."""
        ot_trial = self._ot_trials.get(trial_id)
        if ot_trial is None or VAL_ACC not in result or CUM_EPOCHS not in result:
            return
        value, step = float(result[VAL_ACC]), int(result[CUM_EPOCHS])
        reported = self._reported.setdefault(trial_id, set())
        if step in reported or math.isnan(value):
            return  # replayed after a recovery: already recorded
        first = not reported
        reported.add(step)
        curve = self._epoch_values.setdefault(trial_id, {})
        for i, v in enumerate(reversed(result.get(EPOCH_VAL_ACC) or [])):
            curve[step - i] = float(v)
        stage_end = result.get(STAGE_END, True)  # a rung report (mid-stage) is an intermediate value only
        history = self._stage_values.setdefault(trial_id, {})
        received = self._stage_times.setdefault(trial_id, {})
        if stage_end:
            history[step] = value
            received[step] = round(time.time(), 3)
        steps = sorted(history)
        try:
            if not self.multi_objective:
                ot_trial.report(value, step)
            if stage_end or first:  # (empty lists when stopped before its first stage end)
                ot_trial.set_user_attr(st.ATTR_STAGE_CUM_EPOCHS, steps)
                ot_trial.set_user_attr(st.ATTR_STAGE_VAL_ACC, [history[s] for s in steps])
                # The order the scheduler saw the reports in: a benchmark replays pruning rules on it.
                ot_trial.set_user_attr(st.ATTR_STAGE_REPORTED_AT, [received[s] for s in steps])
            if curve:
                ot_trial.set_user_attr(st.ATTR_EPOCH_VAL_ACC, [curve.get(e) for e in range(1, max(curve) + 1)])
            if TRIAL_SECONDS in result:
                ot_trial.set_user_attr(st.ATTR_TRIAL_SECONDS, round(float(result[TRIAL_SECONDS]), 3))
            if first and N_VAL in result:
                ot_trial.set_user_attr(st.ATTR_N_VAL, int(result[N_VAL]))
            if first and TRIAL_STARTED_AT in result:
                ot_trial.set_user_attr(st.ATTR_TRIAL_STARTED_AT, round(float(result[TRIAL_STARTED_AT]), 3))
            if result.get(REPLAYED):
                # Stages taken from an interrupted run's checkpoints rather than trained again.
                ot_trial.set_user_attr(st.ATTR_REPLAYED_STAGES, sum(1 for s in steps if s <= step))
        except UpdateFinishedTrialError:
            # The study already has this trial's outcome (a resume over a stale Tune snapshot).
            self._completed_trials.add(trial_id)

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        if trial_id in self._completed_trials or result.get(ERROR):
            return
        self._record_stage(trial_id, result)

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        if trial_id in self._completed_trials:
            return
        ot_trial = self._ot_trials.get(trial_id)
        if ot_trial is None:
            return
        values: Any = None
        reason: str | None = None
        interrupted = False
        if result and result.get(ERROR):
            state, reason = TrialState.FAIL, str(result[ERROR])
        elif error:
            state = TrialState.FAIL
            reason = "the trial's worker failed (Ray reported an error; see the Ray session logs)"
        elif not result or VAL_ACC not in result:
            state, interrupted = TrialState.FAIL, True
            reason = "stopped before it reported a stage"
        else:
            # The stopping result: Tune gives it to the scheduler and to on_trial_complete only.
            self._record_stage(trial_id, result)
            if result.get(FINAL):
                state = TrialState.COMPLETE
                val = float(result[VAL_ACC])
                values = [val, float(result[TOTAL_EPOCHS])] if self.multi_objective else val
            else:
                why = self._stop_reason(trial_id) if self._stop_reason is not None else None
                if not self._pruning or (self._stop_reason is not None and why is None):
                    # Cut short by the search (a stop, a time budget), not by the scheduler.
                    state, interrupted = TrialState.FAIL, True
                    reason = "stopped before its last stage"
                else:
                    state, reason = TrialState.PRUNED, why  # Optuna keeps the last intermediate value
        try:
            if state == TrialState.PRUNED and reason:
                ot_trial.set_user_attr(st.ATTR_PRUNED_REASON, reason)
            if state == TrialState.FAIL:
                ot_trial.set_user_attr(st.ATTR_FAIL_REASON, reason)
                if interrupted:
                    ot_trial.set_user_attr(st.ATTR_INTERRUPTED, True)
                if result and result.get("traceback"):
                    ot_trial.set_user_attr("fail_traceback", str(result["traceback"])[-4000:])
            self._ot_study.tell(ot_trial, values, state=state)
        except UpdateFinishedTrialError:
            logger.debug("trial %s was already finished in the study", ot_trial.number)
        except Exception as exc:  # noqa: BLE001 - a bad tell must not end the whole search
            logger.warning("could not record trial %s: %s", ot_trial.number, exc)
        self._completed_trials.add(trial_id)

    def unfinished_trial_numbers(self) -> list[int]:
        return [t.number for tid, t in self._ot_trials.items() if tid not in self._completed_trials]

    def fail_unfinished(self, reason: str) -> list[int]:
        """Mark the trials this searcher started and Tune never finished FAIL (interrupted).

        Call after ``fit()`` returns: Tune leaves the trials running at a Ctrl-C or a time budget
        without telling the searcher, and TPE's constant liar would avoid their parameters forever.
        """
        failed = []
        storage = self._ot_study._storage
        for tid, ot_trial in self._ot_trials.items():
            if tid in self._completed_trials:
                continue
            frozen = storage.get_trial(ot_trial._trial_id)
            if frozen.state == TrialState.RUNNING and st.fail_trial(storage, frozen, reason, interrupted=True):
                failed.append(frozen.number)
            self._completed_trials.add(tid)
        return failed


__all__ = ["StageAwareOptunaSearch"]
