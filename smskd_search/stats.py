"""The standard errors every printed accuracy carries (one definition for the whole tool)."""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence


def binomial_se(p: float, n: int | None) -> float | None:
    """Standard error of an accuracy ``p`` measured on ``n`` samples, sqrt(p(1-p)/n); None without n.

    Example:

        >>> round(binomial_se(0.8, 400), 4)
        0.02
    """
    if not n:
        return None
    return math.sqrt(max(p * (1.0 - p), 0.0) / n)


def difference_se(p: float, n_p: int | None, q: float, n_q: int | None) -> float:
    """Standard error of ``p - q`` for two independent accuracies (a missing n counts as no noise).

    Example:

        >>> round(difference_se(0.8, 400, 0.8, 400), 4)
        0.0283
    """
    return math.sqrt((binomial_se(p, n_p) or 0.0) ** 2 + (binomial_se(q, n_q) or 0.0) ** 2)


def mean_se(xs: Sequence[float]) -> tuple[float, float | None]:
    """Mean of ``xs`` and its standard error (sample std / sqrt(n)); no s.e. from one value.

    Example:

        >>> mean_se([0.01, 0.02, 0.03])
        (0.02, 0.005773502691896258)
    """
    mean = statistics.fmean(xs)
    return mean, (statistics.stdev(xs) / math.sqrt(len(xs)) if len(xs) > 1 else None)


__all__ = ["binomial_se", "difference_se", "mean_se"]
