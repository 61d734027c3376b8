"""What a plan's run yields: per-epoch metrics, per-stage results, the run's result, and its file."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from torch import nn

from smskd_search.data import DataInfo
from smskd_search.engine.evaluate import EvalResult
from smskd_search.engine.teacher import TeacherRecord
from smskd_search.errors import UserError
from smskd_search.plan import Plan


@dataclass
class EpochMetrics:
    epoch: int  # 1-based within the stage
    cum_epochs: int
    train_loss: float
    train_ce: float
    train_kd: float
    train_ref: float
    train_acc: float
    lr: float
    val_acc: float
    val_loss: float


@dataclass
class StageResult:
    """One finished stage: its validation accuracy (with n) at the stage end, and its curve."""

    index: int  # 0-based
    method: str
    epochs: int
    cum_epochs: int
    val_acc: float
    val_loss: float
    n_val: int
    reference_active: bool
    epoch_metrics: list[EpochMetrics] = field(default_factory=list)
    # True when this run took the stage from the stage-prefix cache instead of training it.
    reused: bool = False


def stage_result_from_dict(d: dict) -> StageResult:
    """A :class:`StageResult` from its plain form (as checkpoints and cache entries hold it)."""
    d = dict(d)
    d["epoch_metrics"] = [EpochMetrics(**m) for m in d.get("epoch_metrics", [])]
    return StageResult(**d)


@dataclass
class RunResult:
    """What :func:`~smskd_search.engine.run_plan` returns: the stages' results, the teacher used, the
    student if kept."""

    plan_hash: str
    stages: list[StageResult]
    stopped_early: bool
    resumed_from_stage: int | None
    teacher: TeacherRecord
    data_info: DataInfo
    student: nn.Module | None = None
    # Epochs of this run: taken from the stage cache, trained, and taken from its own checkpoint.
    epochs_reused: int = 0
    epochs_trained: int = 0
    epochs_resumed: int = 0
    # Why the stage cache was not used although one was given (None: used, or none given).
    cache_skipped: str | None = None
    # Trained epochs whose teacher logits came from the logit store (no teacher forward here); a
    # fraction where other processes computed parts of an epoch while this one computed the rest.
    teacher_epochs_served: float = 0.0
    # What the caller should say (a resume from a checkpoint made on another device or precision).
    notes: list[str] = field(default_factory=list)

    @property
    def final_val_acc(self) -> float:
        return self.stages[-1].val_acc

    def to_dict(self) -> dict:
        return {
            "plan_hash": self.plan_hash,
            "stages": [asdict(s) for s in self.stages],
            "stopped_early": self.stopped_early,
            "resumed_from_stage": self.resumed_from_stage,
            "teacher": asdict(self.teacher),
            "epochs_reused": self.epochs_reused,
            "epochs_trained": self.epochs_trained,
            "epochs_resumed": self.epochs_resumed,
        }


class Diverged(UserError):
    """The training loss went non-finite: the plan fails (``train`` exits with the message, a search
    records the trial as FAIL with it as the reason)."""


def write_results(path: Path, plan: Plan, result: RunResult, test: EvalResult | None) -> None:
    """``results.json`` of a ``train`` run: the run's result, the plan's summary, the test accuracy."""
    payload = result.to_dict()
    payload["plan_name"] = plan.name
    payload["sequence"] = plan.sequence()
    payload["total_epochs"] = plan.total_epochs
    payload["final_val_acc"] = result.final_val_acc
    payload["n_val"] = result.stages[-1].n_val
    if test is not None:
        payload["test_acc"], payload["n_test"] = test.acc, test.n
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2))
