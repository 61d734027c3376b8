"""``run_search``: a study of SMSKD plans, Ray Tune trials sampled by Optuna, pruned by stage.

A search is five phases (:mod:`~smskd_search.search.phases`): prepare (check every setting and
hold the study's lock), teacher (create or check, on resume, the study database, then ensure the
teacher), budget, confirmation and summary; Ray runs trials only after the teacher, so that the
dashboard can open the study and every trial finds a trained teacher. Its settings are one
:class:`~smskd_search.search_settings.SearchSettings`, checked when it is made. The other parts:
:mod:`~smskd_search.search.lifecycle` (the study around a run), :mod:`~smskd_search.search.tune_run`
(one Tune run), :mod:`~smskd_search.search.leaderboard`.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from smskd_search.search import phases
from smskd_search.search.confirm import ConfirmSettings
from smskd_search.search.phases import SearchHooks, SearchSummary
from smskd_search.search.progress import ProgressInfo
from smskd_search.search_settings import SearchSettings
from smskd_search.space import LoadedSpace

if TYPE_CHECKING:
    from smskd_search.engine.teacher import TeacherJob, TeacherRecord

DEFAULT_CONFIRM = ConfirmSettings()


def run_search(
    space: LoadedSpace,
    settings: SearchSettings | None = None,
    *,
    on_progress: Callable[[ProgressInfo], None] | None = None,
    on_teacher_epoch: Callable[[int, int, float, float], None] | None = None,
    on_teacher_start: Callable[[TeacherJob], None] | None = None,
    on_teacher_ready: Callable[[TeacherRecord], None] | None = None,
    **flags: Any,
) -> SearchSummary:
    """Search a space's plans on Ray Tune, sampled by Optuna, into ``studies_dir/<study>.db``.

    Args:
        space: The space (:func:`smskd_search.load_space`).
        settings: The search's :class:`~smskd_search.search_settings.SearchSettings`; or leave it
            out and give its fields as keywords (``budget=8, study="demo"``), checked the same way.
        on_progress: Called with a :class:`ProgressInfo` whenever the counts change.
        on_teacher_epoch: Called (epoch, epochs, loss, val_acc) while the teacher trains.
        on_teacher_start: Called with a :class:`~smskd_search.engine.teacher.TeacherJob` (what,
            how long, on which device) before a teacher is trained; not on a cache hit.
        on_teacher_ready: Called with the teacher's
            :class:`~smskd_search.engine.teacher.TeacherRecord` once it is ensured, before any trial.
        flags: The fields of :class:`~smskd_search.search_settings.SearchSettings` (budget, study,
            studies_dir, max_concurrent, cpus_per_trial, gpus_per_trial, address, seed, timeout,
            resume, prune, baselines, confirm, deterministic, cache, cache_max_bytes, storage).

    Returns:
        The study's :class:`SearchSummary`. Ctrl-C stops cleanly: finished trials stay, and the
        summary says ``interrupted``.

    Example:

        >>> from smskd_search import load_space, run_search
        >>> summary = run_search(load_space("default"), budget=4, study="demo")  # doctest: +SKIP
        >>> summary.best.sequence  # doctest: +SKIP
        'dkd(8)'
    """
    if settings is not None and flags:
        raise TypeError(f"run_search: give either settings or its fields as keywords, not both (got {sorted(flags)})")
    settings = settings if settings is not None else SearchSettings(**flags)
    hooks = SearchHooks(on_progress, on_teacher_epoch, on_teacher_start, on_teacher_ready)
    with phases.prepare(space, settings, hooks, start=time.monotonic()) as run:
        tune = phases.teacher(run)
        spent = phases.budget(run, tune)
        confirmed = phases.confirmation(run, tune, spent)
        return phases.summary(run, tune, spent, confirmed)


__all__ = ["SearchSettings", "SearchSummary", "run_search"]
