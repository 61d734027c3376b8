"""The standard errors every printed accuracy carries (one definition for the whole tool)."""

from __future__ import annotations

import math


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


__all__ = ["binomial_se", "difference_se"]
