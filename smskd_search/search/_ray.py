"""Environment for Ray, set before ``import ray``: every module of the search imports Ray from here.

- ``RAY_AUTH_MODE=disabled``: Ray 2.60 otherwise turns token auth on for a new local cluster and
  writes ``~/.ray/auth_token``.
- No warning about slow experiment snapshots (our trials report a checkpoint at every stage).
- No per-trial CSV/JSON/TensorBoard loggers: the study database is the record of a search.
- Trials keep the driver's working directory, so that relative paths of a space resolve the same
  in a trial as on the command line.
"""

from __future__ import annotations

import os

ENV_DEFAULTS = {
    "RAY_AUTH_MODE": "disabled",
    "TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S": "0",
    "TUNE_DISABLE_AUTO_CALLBACK_LOGGERS": "1",
    "RAY_CHDIR_TO_TRIAL_DIR": "0",
    "RAY_AIR_NEW_OUTPUT": "0",
}
for _key, _value in ENV_DEFAULTS.items():
    os.environ.setdefault(_key, _value)

import ray  # noqa: E402
from ray import tune  # noqa: E402

__all__ = ["ENV_DEFAULTS", "ray", "tune"]
