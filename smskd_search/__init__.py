"""smskd-search: AutoML for Sequential Multi-Stage Knowledge Distillation.

What a notebook needs, from one place:

    >>> from smskd_search import load_space, make_plan, run_plan, run_search
    >>> space = load_space("default")                       # a built-in space, or a file
    >>> plan = make_plan(space, [("kd", 4), ("dkd", 4)])    # one SMSKD pipeline
    >>> plan.sequence()
    'kd(4) -> dkd(4)'
    >>> result = run_plan(plan)  # doctest: +SKIP
    >>> summary = run_search(space, budget=50)  # doctest: +SKIP

Plans are plain typed data (:class:`Plan`), YAML in and out (:func:`load_plan`, :func:`save_plan`).
The names are imported on first use, so that ``import smskd_search`` (and the command line's
answer to a bad flag) does not wait for torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_EXPORTS = {
    "Diverged": "smskd_search.engine",
    "RunResult": "smskd_search.engine",
    "StageResult": "smskd_search.engine",
    "run_plan": "smskd_search.engine",
    "RunOptions": "smskd_search.engine",
    "Workbench": "smskd_search.engine",
    "UserError": "smskd_search.errors",
    "Plan": "smskd_search.plan",
    "save_plan": "smskd_search.plan",
    "SearchSettings": "smskd_search.search_settings",
    "SearchSummary": "smskd_search.search",
    "TrialReport": "smskd_search.search",
    "run_search": "smskd_search.search",
    "LoadedSpace": "smskd_search.space",
    "Space": "smskd_search.space",
    "load_space": "smskd_search.space",
    "make_plan": "smskd_search.space",
    "load_plan": "smskd_search.validate",
}

__all__ = [
    "Diverged",
    "LoadedSpace",
    "Plan",
    "RunOptions",
    "RunResult",
    "SearchSettings",
    "SearchSummary",
    "Space",
    "StageResult",
    "TrialReport",
    "UserError",
    "Workbench",
    "load_plan",
    "load_space",
    "make_plan",
    "run_plan",
    "run_search",
    "save_plan",
]
assert sorted(__all__) == sorted(_EXPORTS)

if TYPE_CHECKING:
    from smskd_search.engine import Diverged, RunOptions, RunResult, StageResult, Workbench, run_plan
    from smskd_search.errors import UserError
    from smskd_search.plan import Plan, save_plan
    from smskd_search.search import SearchSummary, TrialReport, run_search
    from smskd_search.search_settings import SearchSettings
    from smskd_search.space import LoadedSpace, Space, load_space, make_plan
    from smskd_search.validate import load_plan


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'smskd_search' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])
