"""The stream of a run's stage events: what a caller (the ``train`` command's lines, a search's
reports to its scheduler) hears of a run, in the order it happens.

A run emits, per stage, either :class:`StageResumed` (taken from its own checkpoint, at the start),
:class:`StageReused` (taken from the stage-prefix cache) or its epochs (:class:`EpochsReused` for
those taken from a partial cache entry, :class:`EpochTrained` for each trained one) and then
:class:`StageTrained`. A sink that returns True after a :class:`StageTrained` or :class:`StageReused`
stops the run there (a search prunes through this).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from smskd_search.engine.results import EpochMetrics, StageResult


@dataclass(frozen=True)
class StageResumed:
    """A finished stage taken from the run's own checkpoint (``resume``): reported, not trained."""

    stage: int  # 0-based
    result: StageResult


@dataclass(frozen=True)
class EpochsReused:
    """A stage's first epochs, taken from a partial stage-cache entry (the stage trains the rest)."""

    stage: int
    metrics: list[EpochMetrics]


@dataclass(frozen=True)
class EpochTrained:
    """One trained epoch, with its validation pass."""

    stage: int
    metrics: EpochMetrics


@dataclass(frozen=True)
class StageReused:
    """A finished stage taken from the stage-prefix cache (``result.reused``); the last one of such
    a prefix comes with its checkpoint, where the run keeps checkpoints."""

    stage: int
    result: StageResult
    checkpoint: Path | None


@dataclass(frozen=True)
class StageTrained:
    """A stage trained to its end (part of it may have come from a partial entry), with its checkpoint."""

    stage: int
    result: StageResult
    checkpoint: Path | None


StageEvent = StageResumed | EpochsReused | EpochTrained | StageReused | StageTrained
# Returns True (after a stage's end) to stop the run there.
EventSink = Callable[[StageEvent], "bool | None"]


class StageCallback(Protocol):
    def __call__(self, stage_index: int, cum_epochs: int, result: StageResult, checkpoint: Path | None) -> bool | None:
        """Return True to stop the run after this stage."""


def from_callbacks(on_stage_end: StageCallback | None = None,
                   on_epoch_end: Callable[[int, EpochMetrics], None] | None = None,
                   on_epochs_reused: Callable[[int, list[EpochMetrics]], None] | None = None) -> EventSink:
    """An event sink that calls the three callbacks of the engine's earlier interface.

    Args:
        on_stage_end: Called with (stage, cumulative epochs, result, checkpoint) at a stage's end,
            trained or reused; True stops the run.
        on_epoch_end: Called with (stage, metrics) after each trained epoch.
        on_epochs_reused: Called with (stage, metrics) of the epochs taken from a partial entry.
    """

    def sink(event: StageEvent) -> bool | None:
        if isinstance(event, EpochTrained) and on_epoch_end is not None:
            on_epoch_end(event.stage, event.metrics)
        elif isinstance(event, EpochsReused) and on_epochs_reused is not None:
            on_epochs_reused(event.stage, event.metrics)
        elif isinstance(event, (StageTrained, StageReused)) and on_stage_end is not None:
            return on_stage_end(event.stage, event.result.cum_epochs, event.result, event.checkpoint)
        return None

    return sink
