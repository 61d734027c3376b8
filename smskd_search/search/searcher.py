"""The Tune searcher: Optuna's ask/tell on our study, through Ray's public ``Searcher`` API.

Tune asks :meth:`StudySearcher.suggest` for a trial's config; the searcher calls ``study.ask()``
(which hands out enqueued trials first: baselines, reruns of interrupted trials), lets the
define-by-run function sample the plan on that Optuna trial, and keeps the map from Tune's trial id
to the Optuna trial. Reports (:class:`TrialReport`) become intermediate values keyed by cumulative
epochs (the scheduler's time axis) plus the stage values, curve and timings as user attributes; the
end of a trial is told as:

- COMPLETE with its value when its last report says ``final``;
- PRUNED (with the scheduler's reason) when the scheduler stopped it earlier; Tune passes the
  stopping result to ``on_trial_complete`` only, so it is recorded first;
- FAIL with ``fail_reason`` when the plan raised or diverged, the worker died, or the search cut it
  short (``interrupted``: a resume runs it again).

A trial whose plan (:meth:`Plan.canonical_hash`, the same seed included) already COMPLETE in the
study is not trained again: it is told COMPLETE with that trial's value and stage values
(``repeat_of`` names it), so that the sampler learns the plan's value once more without paying
for it, and the next plan is asked for. Such answered trials are off the budget: the searcher hands
``max_trials`` trials to Tune.

Given ``follow_up``, the searcher does not finish there: from then on, each time a trial has been
told, it calls ``follow_up``, which enqueues in the study what may run now (the confirmation runs
whose plans no trial still running can displace) and says how many; those are handed out next, in
the same Tune run and its workers, whose data and teacher are loaded (a second Tune run would start
and load fresh ones: a GPU idled about 20 s between the two). While budget trials run and nothing is
enqueued, ``suggest`` returns None; once they are all told and nothing more comes, ``FINISHED``.

After a hard kill the study may already hold a trial's outcome; telling it again raises
``UpdateFinishedTrialError``, which is expected and ignored. Trials left RUNNING when Tune stops
(Ctrl-C, time budget) are not told anything by Tune: :meth:`StudySearcher.fail_unfinished` marks
them FAIL after ``fit()``. No private attribute of Ray or Optuna is used.
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import optuna
from optuna.exceptions import UpdateFinishedTrialError
from optuna.trial import FrozenTrial, TrialState

from smskd_search.search._ray import ray  # noqa: F401  (the environment before Ray's import)
from smskd_search.search.lifecycle import MAX_REPEATS_IN_A_ROW
from smskd_search.search.record import TrialAttrs, TrialRecord, write_trial_attrs
from smskd_search.search.trial_report import METRIC, TrialReport

from ray.tune.search import Searcher

logger = logging.getLogger(__name__)

DefineByRun = Callable[[optuna.Trial], dict[str, Any]]


@dataclass(frozen=True)
class _Finished:
    """A COMPLETE trial, as much of it as a repeat of its plan needs."""

    number: int
    values: list[float]
    attrs: TrialAttrs  # what a repeat takes over from the trial that trained the plan


@dataclass
class _Record:
    """What the searcher has recorded of one trial (so that replayed reports are not doubled)."""

    steps: set[int] = field(default_factory=set)
    stage_values: dict[int, float] = field(default_factory=dict)
    stage_times: dict[int, float] = field(default_factory=dict)
    curve: dict[int, float] = field(default_factory=dict)


class StudySearcher(Searcher):
    """A Tune searcher that asks and tells an Optuna study itself; see the module docstring.

    Args:
        study: The study to ask and tell (its sampler samples the plans).
        define: The define-by-run function: samples a plan on the Optuna trial, sets its user
            attributes and returns the Tune config of the trial.
        pruning: Whether a scheduler may stop trials: only then is a trial that ends before its last
            stage PRUNED (otherwise the search cut it short: FAIL, interrupted).
        stop_reason: The scheduler's account of why it stopped a trial (Tune trial id -> reason or
            None); a stopped trial without a reason was cut short by the search.
        max_trials: Trials to hand to Tune (answered repeats not included); then ``FINISHED``.
        max_repeats: Finished plans the sampler may propose in a row before the searcher gives up
            (``exhausted``) and returns ``FINISHED``.
        explore: The sampler of the ask after a repeat (None: the study's own sampler throughout).
        follow_up: Called once ``max_trials`` are handed (or the sampler is exhausted), and again
            after each trial told; enqueues trials in the study and returns how many, which are
            handed out next (None: ``FINISHED`` there).
        confirmations_off_budget: A confirmation run found waiting in the study (a search stopped
            after enqueueing it) is handed out without counting toward ``max_trials``: true for
            the budget's runs, false for a run of confirmation runs alone (they are its trials).

    Example:

        >>> import optuna
        >>> study = optuna.create_study(direction="maximize")
        >>> s = StudySearcher(study, lambda t: {"x": t.suggest_int("x", 0, 3)}, pruning=False)
        >>> sorted(s.suggest("t1"))
        ['x']
        >>> s.on_trial_complete("t1", {"val_acc": 0.5, "cum_epochs": 2, "final": True, "total_epochs": 2})
        >>> study.trials[0].state.name, study.trials[0].value
        ('COMPLETE', 0.5)
    """

    def __init__(self, study: optuna.Study, define: DefineByRun, *, pruning: bool = True,
                 stop_reason: Callable[[str], str | None] | None = None, max_trials: int | None = None,
                 max_repeats: int = MAX_REPEATS_IN_A_ROW, explore: optuna.samplers.BaseSampler | None = None,
                 follow_up: Callable[[], int] | None = None, confirmations_off_budget: bool = False):
        self.multi_objective = len(study.directions) > 1
        super().__init__(metric=METRIC, mode="max")
        self.study = study
        self._define = define
        # Without a pruning scheduler an unfinished trial was cut short by the search, not pruned.
        self._pruning = pruning and not self.multi_objective
        self._stop_reason = stop_reason
        self._trials: dict[str, optuna.Trial] = {}
        self._finished: set[str] = set()
        self._records: dict[str, _Record] = {}
        self._max_trials = max_trials
        self._max_repeats = max_repeats
        self._explore = explore
        self._handed = 0  # trials handed to Tune
        self._follow_up = follow_up
        self._confirmations_off_budget = confirmations_off_budget
        self._budget_ids: set[str] = set()  # Tune ids of the budget's trials (not the follow-ups)
        self._follow_left = 0  # follow-ups enqueued in the study and not asked yet
        self._told_at_follow_up = -1  # trials told when follow_up was last called
        self._past_budget = False  # every budget trial handed out (or the sampler exhausted)
        self.followed = 0  # follow-ups enqueued so far
        self._in_a_row = 0  # finished plans proposed since the last new one
        # True once the sampler proposed only finished plans max_repeats times in a row.
        self.exhausted = False
        # Trial numbers answered from the study (a progress line counts them as done).
        self.answered: list[int] = []
        self._finished_plans: dict[str, _Finished] = {}
        for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
            self._remember(t)

    # ------------------------------------------------------------------ Tune's Searcher interface
    def set_search_properties(self, metric: str | None, mode: str | None, config: dict, **spec: Any) -> bool:
        # The objective is fixed by the study; accept only a request that matches it.
        return metric in (None, METRIC) and mode in (None, "max")

    def suggest(self, trial_id: str) -> dict[str, Any] | str | None:  # type: ignore[override]  # FINISHED is a str
        while self._max_trials is None or self._handed < self._max_trials:
            if self._in_a_row >= self._max_repeats:
                self.exhausted = True
                break
            with self._sampler_of_this_ask():
                trial, config, done = self._ask(trial_id)
            if self._confirmations_off_budget and config.get("confirmation") and done is None:
                # A confirmation run a stopped search left waiting (Optuna asks enqueued trials
                # first): it runs now, off the budget, as a follow-up would.
                self.followed += 1
                return config
            if done is None:
                self._handed += 1
                self._in_a_row = 0
                self._budget_ids.add(trial_id)
                return config
            del self._trials[trial_id]
            self._answer_repeat(trial, done)
            self._in_a_row += 1
        self._past_budget = True
        return self._suggest_follow_up(trial_id)

    def _suggest_follow_up(self, trial_id: str) -> dict[str, Any] | str | None:
        """After the budget: the next follow-up, None while the budget's trials may still bring one,
        else ``FINISHED``."""
        if self._follow_up is None:
            return Searcher.FINISHED
        self._enqueue_follow_ups()
        while self._follow_left > 0:
            self._follow_left -= 1
            trial, config, done = self._ask(trial_id)  # an enqueued trial: asked first, in order
            if done is None:
                return config
            del self._trials[trial_id]
            self._answer_repeat(trial, done)
        if any(tid not in self._finished for tid in self._budget_ids):
            return None  # what comes next depends on the values of the budget's last trials
        return Searcher.FINISHED

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        report = TrialReport.from_dict(result)
        if trial_id in self._finished or report is None or report.error:
            return
        self._record(trial_id, report)

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        if trial_id in self._finished or trial_id not in self._trials:
            return
        report = TrialReport.from_dict(result)
        if report is not None and report.error:
            self._tell(trial_id, None, TrialState.FAIL, fail_reason=report.error, traceback=report.traceback,
                       infrastructure=report.infrastructure)
        elif error:
            # The worker died or Tune gave up on it (a lost node or actor): not the plan's doing.
            self._tell(trial_id, None, TrialState.FAIL, infrastructure=True,
                       fail_reason="the trial's worker failed (Ray reported an error; see the Ray session logs)")
        elif report is None:
            self._tell(trial_id, None, TrialState.FAIL, fail_reason="stopped before it reported a stage",
                       interrupted=True)
        else:
            self._record(trial_id, report)  # the stopping result reaches only this hook
            if report.final:
                values: Any = ([report.val_acc, float(report.total_epochs or 0)] if self.multi_objective
                               else report.val_acc)
                self._tell(trial_id, values, TrialState.COMPLETE)
            else:
                why = self._stop_reason(trial_id) if self._stop_reason is not None else None
                if not self._pruning or (self._stop_reason is not None and why is None):
                    self._tell(trial_id, None, TrialState.FAIL, fail_reason="stopped before its last stage",
                               interrupted=True)
                else:
                    # Optuna keeps the last intermediate value as a pruned trial's value.
                    self._tell(trial_id, None, TrialState.PRUNED, pruned_reason=why)
        # Now rather than at the next ask: Tune's callbacks (the progress line) hear of this trial
        # next, and should see the follow-ups it lets run.
        self._enqueue_follow_ups()

    def save(self, checkpoint_path: str) -> None:
        # Tune snapshots the searcher with its experiment; a resume works from the study instead,
        # so only the id map is kept (readable, for whoever inspects a Tune run folder).
        with open(checkpoint_path, "w") as f:
            json.dump({tid: t.number for tid, t in self._trials.items()}, f)

    def restore(self, checkpoint_path: str) -> None:
        # Nothing to restore: the study is the record (see save).
        return None

    # ------------------------------------------------------------------ ours
    def trial_number(self, trial_id: str) -> int | None:
        """The Optuna trial number of a Tune trial (None if this searcher did not start it)."""
        trial = self._trials.get(trial_id)
        return trial.number if trial is not None else None

    def fail_unfinished(self, reason: str) -> list[int]:
        """Mark the trials this searcher started and Tune never finished FAIL (interrupted).

        Call after ``fit()`` returns: Tune leaves the trials running at a Ctrl-C or a time budget
        without telling the searcher, and TPE's constant liar would avoid their parameters forever.
        """
        failed = []
        running = {t.number for t in self.study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))}
        for tid, trial in list(self._trials.items()):
            if tid in self._finished:
                continue
            if trial.number not in running:
                self._finished.add(tid)
            elif self._tell(tid, None, TrialState.FAIL, fail_reason=reason, interrupted=True):
                failed.append(trial.number)
        return failed

    @property
    def budget_handed_out(self) -> bool:
        """Whether every budget trial has been handed to Tune (or the sampler is exhausted)."""
        return self._past_budget

    def _enqueue_follow_ups(self) -> None:
        """Past the budget, once per trial told: let ``follow_up`` enqueue what may run now."""
        if self._follow_up is None or not self._past_budget or self._told_at_follow_up == len(self._finished):
            return  # Tune asks every few milliseconds while the last trials run: only news is worth a look
        self._told_at_follow_up = len(self._finished)
        n = self._follow_up()
        self._follow_left += n
        self.followed += n

    def _ask(self, trial_id: str) -> tuple[optuna.Trial, dict[str, Any], _Finished | None]:
        """Ask the study for a trial and its config; the finished trial of its plan, if any."""
        trial = self.study.ask()
        self._trials[trial_id] = trial
        try:
            config = self._define(trial)
        except BaseException as exc:
            self._tell(trial_id, None, TrialState.FAIL, fail_reason=f"sampling failed: {type(exc).__name__}: {exc}")
            raise
        key = config.get("plan_key")
        if key:
            # Stored on the trial: what a repeat of its plan is looked up by, now and on resume.
            write_trial_attrs(trial, TrialAttrs(plan_key=key))
        return trial, config, self._finished_plans.get(key) if key else None

    @contextlib.contextmanager
    def _sampler_of_this_ask(self) -> Iterator[None]:
        # Optuna samples at ask (relative) and at every suggest call (independent) from
        # study.sampler, so the explorer stands in for both, then the study's sampler is back.
        if not self._in_a_row or self._explore is None:
            yield
            return
        own = self.study.sampler
        self.study.sampler = self._explore
        try:
            yield
        finally:
            self.study.sampler = own

    def _answer_repeat(self, trial: optuna.Trial, done: _Finished) -> None:
        write_trial_attrs(trial, done.attrs.replace(repeat_of=done.number))
        self.study.tell(trial, done.values if self.multi_objective else done.values[0], state=TrialState.COMPLETE)
        self.answered.append(trial.number)

    def _record(self, trial_id: str, r: TrialReport) -> None:
        """One report: an intermediate value at its cumulative epochs; stage ends also as attrs."""
        trial = self._trials.get(trial_id)
        if trial is None or not r.has_value:
            return
        rec = self._records.setdefault(trial_id, _Record())
        if r.cum_epochs in rec.steps:
            return  # replayed after a recovery: already recorded
        first = not rec.steps
        rec.steps.add(r.cum_epochs)
        for i, v in enumerate(reversed(r.epoch_val_acc)):
            rec.curve[r.cum_epochs - i] = v
        if r.stage_end:  # a rung report (mid-stage) is an intermediate value only
            rec.stage_values[r.cum_epochs] = r.val_acc
            rec.stage_times[r.cum_epochs] = round(time.time(), 3)
        steps = sorted(rec.stage_values)
        try:
            if not self.multi_objective:
                trial.report(r.val_acc, r.cum_epochs)
            write_trial_attrs(trial, _report_attrs(r, rec, steps, first))
        except UpdateFinishedTrialError:
            # The study already has this trial's outcome (a resume over a stale Tune snapshot).
            self._finished.add(trial_id)

    def _tell(self, trial_id: str, values: Any, state: TrialState, *, fail_reason: str | None = None,
              pruned_reason: str | None = None, interrupted: bool = False,
              traceback: str | None = None, infrastructure: bool = False) -> bool:
        """Finish the trial in the study; False if the study had finished it already."""
        self._finished.add(trial_id)
        trial = self._trials[trial_id]
        failed = fail_reason is not None
        try:
            write_trial_attrs(trial, TrialAttrs(
                pruned_reason=pruned_reason or None, fail_reason=fail_reason,
                interrupted=True if failed and interrupted else None,
                infrastructure=True if failed and infrastructure else None,
                fail_traceback=traceback[-4000:] if failed and traceback else None))
            # A trial the study finished already (a resume over a stale Tune snapshot) stays as it is.
            self._remember(self.study.tell(trial, values, state=state, skip_if_finished=True))
        except UpdateFinishedTrialError:
            logger.debug("trial %s was already finished in the study", trial.number)
            return False
        except Exception as exc:  # noqa: BLE001 - a bad tell must not end the whole search
            logger.warning("could not record trial %s: %s", trial.number, exc)
            return False
        return True

    def _remember(self, t: FrozenTrial) -> None:
        """A COMPLETE trial's plan, so that a repeat of it is answered from its result."""
        r = TrialRecord.from_trial(t)
        key = r.attrs.plan_key  # as stored: a plan trained before keys were stored is trained again
        if r.state == TrialState.COMPLETE and key and key not in self._finished_plans:
            a = r.attrs
            self._finished_plans[key] = _Finished(r.number, list(t.values), TrialAttrs(
                n_val=a.n_val, stage_cum_epochs=a.stage_cum_epochs, stage_val_acc=a.stage_val_acc,
                epoch_val_acc=a.epoch_val_acc))


def _report_attrs(r: TrialReport, rec: _Record, steps: list[int], first: bool) -> TrialAttrs:
    """What one report adds to the trial's stored attributes (unset fields are left as they are)."""
    stages = r.stage_end or first  # (empty lists when stopped before its first stage end)
    last = r.cum_epochs == max(rec.steps)
    return TrialAttrs(
        stage_cum_epochs=tuple(steps) if stages else None,
        stage_val_acc=tuple(rec.stage_values[s] for s in steps) if stages else None,
        # The order the scheduler saw the reports in: a benchmark replays pruning rules on it.
        stage_reported_at=tuple(rec.stage_times[s] for s in steps) if stages else None,
        epoch_val_acc=tuple(rec.curve.get(e) for e in range(1, max(rec.curve) + 1)) if rec.curve else None,
        trial_seconds=round(r.trial_seconds, 3) if r.trial_seconds is not None else None,
        n_val=int(r.n_val) if first and r.n_val else None,
        trial_started_at=round(r.trial_started_at, 3) if first and r.trial_started_at is not None else None,
        node=r.node if first and r.node is not None else None,
        # How much of the trial the stage-prefix cache supplied, and how much it trained.
        epochs_reused=int(r.epochs_reused) if last else None,
        epochs_trained=int(r.epochs_trained) if last else None,
        images_trained=int(r.images_trained) if last and r.images_trained else None,
        teacher_epochs_served=round(float(r.teacher_epochs_served), 3) if last and r.teacher_epochs_served else None,
        teacher_wait_s=float(r.teacher_wait_s) if last and r.teacher_wait_s else None,
        # Stages taken from an interrupted run's checkpoints rather than trained again.
        replayed_stages=sum(1 for s in steps if s <= r.cum_epochs) if r.replayed else None,
    )


__all__ = ["DefineByRun", "StudySearcher"]
