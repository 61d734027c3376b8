"""A search's own flag ranges, checked before anything is imported, written or started.

Kept apart from :mod:`smskd_search.search` (which imports torch, Ray and scikit-learn: about ten
seconds on a small machine) so that the command line says what is wrong with a flag at once.
"""

from __future__ import annotations

from smskd_search.errors import UserError


def check_requests(cpus_per_trial: float | None, gpus_per_trial: float | None, max_concurrent: int | None) -> None:
    """The resource flags' own ranges."""
    if cpus_per_trial is not None and cpus_per_trial <= 0:
        raise UserError(f"--cpus-per-trial must be > 0 (got {cpus_per_trial:g})")
    if gpus_per_trial is not None and gpus_per_trial < 0:
        raise UserError(f"--gpus-per-trial must be >= 0 (got {gpus_per_trial:g})")
    if max_concurrent is not None and max_concurrent < 1:
        raise UserError(f"--max-concurrent must be >= 1 (got {max_concurrent})")


def check_search_flags(*, budget: int, timeout: float | None, cpus_per_trial: float | None,
                       gpus_per_trial: float | None, max_concurrent: int | None, cache: bool, cache_max_bytes: int,
                       deterministic: bool, confirm: tuple[int, int, int] | None) -> None:
    """Every search flag that can be judged alone; ``confirm`` is (plans, baselines, seeds) or None.

    Example:
        >>> check_search_flags(budget=0, timeout=None, cpus_per_trial=None, gpus_per_trial=None,
        ...                    max_concurrent=None, cache=True, cache_max_bytes=1, deterministic=False, confirm=None)
        Traceback (most recent call last):
        ...
        smskd_search.errors.UserError: --budget must be >= 1 (got 0)
    """
    if budget < 1:
        raise UserError(f"--budget must be >= 1 (got {budget})")
    if timeout is not None and timeout <= 0:
        raise UserError(f"--timeout must be > 0 seconds (got {timeout:g})")
    check_requests(cpus_per_trial, gpus_per_trial, max_concurrent)
    if cache and cache_max_bytes < 1:
        raise UserError(f"--cache-max-gb must be > 0 (got {cache_max_bytes / 2**30:g})")
    if deterministic and max_concurrent not in (None, 1):
        raise UserError(f"--max-concurrent {max_concurrent}: --deterministic runs one trial at a time")
    if confirm is not None and min(confirm) < 0:
        raise UserError(f"--confirm/--confirm-seeds must be >= 0 (got {confirm[0]} plans, {confirm[2]} seeds)")


__all__ = ["check_requests", "check_search_flags"]
