"""The SMSKD engine: run a plan stage by stage. Imports neither Ray nor Optuna.

Where things are, in the order a run meets them:

- :mod:`~smskd_search.engine.workbench`: what a worker sets up once (device, data, teacher, caches).
- :mod:`~smskd_search.engine.run`: :func:`run_plan`, the loop over the plan's stages.
- :mod:`~smskd_search.engine.stage_store`: one lookup and put for a stage's state (the run's own
  checkpoints, the stage-prefix cache's prefixes and partial stages).
- :mod:`~smskd_search.engine.stage`: one stage: build, go on from a partial entry, train, evaluate.
- :mod:`~smskd_search.engine.events`: what a run tells its caller (resumed, reused, trained).
- :mod:`~smskd_search.engine.checkpoints`, :mod:`~smskd_search.engine.results`: stage checkpoints
  and what a run returns.
"""

from smskd_search.engine.checkpoints import (
    UnsafeCheckpoint,
    discard_unsafe_checkpoints,
    latest_checkpoint,
    load_checkpoint,
)
from smskd_search.engine.device import pick_device, pick_precision
from smskd_search.engine.evaluate import EvalResult, evaluate
from smskd_search.engine.events import (
    EpochsReused,
    EpochTrained,
    EventSink,
    StageEvent,
    StageResumed,
    StageReused,
    StageTrained,
)
from smskd_search.engine.frozen import FrozenOutputsMemo
from smskd_search.engine.logit_store import LogitStore, StoreMismatch, teacher_logits_key
from smskd_search.engine.prefix_cache import (
    DEFAULT_MAX_BYTES,
    PrefixCache,
    Runtime,
    partial_stage_key,
    stage_prefix_key,
)
from smskd_search.engine.results import Diverged, EpochMetrics, RunResult, StageResult, write_results
from smskd_search.engine.run import RunOptions, evaluate_test, run_plan
from smskd_search.engine.tcp import reference_loss, tcp_weights
from smskd_search.engine.teacher import TeacherRecord, ensure_teacher, load_teacher, teacher_dir
from smskd_search.engine.workbench import Workbench

__all__ = [
    "DEFAULT_MAX_BYTES",
    "Diverged",
    "FrozenOutputsMemo",
    "LogitStore",
    "PrefixCache",
    "Runtime",
    "EpochMetrics",
    "EpochTrained",
    "EpochsReused",
    "EventSink",
    "RunOptions",
    "StageEvent",
    "StageResumed",
    "StageReused",
    "StageTrained",
    "Workbench",
    "EvalResult",
    "RunResult",
    "StageResult",
    "StoreMismatch",
    "TeacherRecord",
    "UnsafeCheckpoint",
    "discard_unsafe_checkpoints",
    "ensure_teacher",
    "evaluate",
    "evaluate_test",
    "latest_checkpoint",
    "load_checkpoint",
    "load_teacher",
    "pick_device",
    "pick_precision",
    "reference_loss",
    "partial_stage_key",
    "run_plan",
    "stage_prefix_key",
    "tcp_weights",
    "teacher_logits_key",
    "teacher_dir",
    "write_results",
]
