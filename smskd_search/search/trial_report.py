"""What a trial tells the search: one typed report per stage end, rung or failure.

The trainable builds a :class:`TrialReport` and sends ``report.to_dict()`` through ``tune.report``;
the scheduler and the searcher read Tune's result dict back with :meth:`TrialReport.from_dict`,
which ignores the keys Tune adds (``training_iteration``, ``time_this_iter_s``...). One definition of
the keys, so that the three cannot drift apart.

Example:

    >>> r = TrialReport(val_acc=0.9, cum_epochs=4, stage=2, n_stages=2, final=True, n_val=503)
    >>> TrialReport.from_dict({**r.to_dict(), "training_iteration": 2}) == r
    True
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields
from typing import Any

# The result key Tune's search properties name (validation accuracy, maximised).
METRIC = "val_acc"
# The scheduler's time axis.
TIME_ATTR = "cum_epochs"


@dataclass(frozen=True)
class TrialReport:
    """One report of a trial.

    Args:
        val_acc: Validation accuracy after ``cum_epochs`` epochs (NaN in a failure report).
        cum_epochs: Cumulative epochs trained over all stages so far.
        stage: 1-based index of the stage the report belongs to (0 in a failure report).
        n_stages: Stages in the trial's plan.
        final: True on the report at the end of the plan's last stage.
        n_val: Size of the validation split (the accuracy's sample size).
        stage_end: True at a stage end; False at a rung inside a stage.
        total_epochs: The plan's total epochs.
        method: The stage's method.
        val_loss: Validation loss at the report.
        replayed: True when the stage came from an interrupted run's checkpoint, not training.
        reused: True when the stage came from the stage-prefix cache (another trial trained it).
        epochs_reused: Epochs of this trial taken from the stage-prefix cache up to here.
        epochs_trained: Epochs this trial trained up to here.
        images_trained: Training images its trained epochs went through (epochs times the split's size).
        teacher_epochs_served: Trained epochs whose teacher logits it read from the teacher-logit store
            (other trials had run the teacher over them; a fraction where it computed parts of an epoch).
        teacher_wait_s: Seconds it waited for another trial computing an epoch's teacher logits.
        baseline: True for an enqueued baseline (measured in full, never pruned).
        confirmation: True for a confirmation run (measured in full, never pruned, and not recorded at
            the rungs: it is another seed of a plan the rungs have seen).
        trial_seconds: Seconds inside the trainable so far.
        trial_started_at: Unix time the trainable started.
        node: The Ray node the trial ran on (its node id; None outside Ray).
        epoch_val_acc: Validation accuracy after each epoch of the stage up to here.
        error: The failure, in one line; set only on a failure report.
        infrastructure: The failure came from the machinery (storage, memory, the device), not from
            the plan: the search retries it and does not count it toward the budget.
        traceback: The failure's traceback (truncated).
    """

    val_acc: float
    cum_epochs: int
    stage: int = 0
    n_stages: int = 0
    final: bool = False
    n_val: int | None = None
    stage_end: bool = True
    total_epochs: int | None = None
    method: str | None = None
    val_loss: float | None = None
    replayed: bool = False
    reused: bool = False
    epochs_reused: int = 0
    epochs_trained: int = 0
    images_trained: int = 0
    teacher_epochs_served: float = 0.0
    teacher_wait_s: float = 0.0
    baseline: bool = False
    confirmation: bool = False
    trial_seconds: float | None = None
    trial_started_at: float | None = None
    node: str | None = None
    epoch_val_acc: list[float] = field(default_factory=list)
    error: str | None = None
    traceback: str | None = None
    infrastructure: bool = False

    @classmethod
    def failure(cls, error: str, *, total_epochs: int | None = None, traceback: str | None = None,
                cum_epochs: int = 0, stage: int = 0, infrastructure: bool = False) -> TrialReport:
        """The report of a plan that raised (or diverged): no value, the reason in one line."""
        return cls(val_acc=math.nan, cum_epochs=cum_epochs, stage=stage, total_epochs=total_epochs,
                   error=error, traceback=traceback, infrastructure=infrastructure)

    @property
    def has_value(self) -> bool:
        return self.error is None and not math.isnan(self.val_acc)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, result: dict[str, Any] | None) -> TrialReport | None:
        """The report inside a Tune result, or None where the result carries none (no value, no
        time), as Tune's last result of a trial that never reported."""
        if not result or METRIC not in result or TIME_ATTR not in result:
            return None
        known = {f.name for f in fields(cls)}
        data = {k: v for k, v in result.items() if k in known}
        data["val_acc"] = float(data["val_acc"])
        data["cum_epochs"] = int(data["cum_epochs"])
        data["epoch_val_acc"] = [float(v) for v in data.get("epoch_val_acc") or []]
        return cls(**data)


__all__ = ["METRIC", "TIME_ATTR", "TrialReport"]
