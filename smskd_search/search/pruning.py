"""Stage-level pruning: asynchronous successive halving on cumulative epochs, with a noise margin.

The rule of ASHA (Li et al., 2020): milestones (rungs) at ``grace_period * reduction_factor**k``
cumulative epochs up to ``max_t``; a trial's value at a rung is compared with the values other
trials were recorded with at that rung, and the trial is stopped when it is below their
``1 - 1/reduction_factor`` quantile. Trials report at stage ends and, where the space says
``decide_at: rungs`` (the default), also after exactly each rung's cumulative epochs inside a stage.

Three differences from Ray's ``AsyncHyperBandScheduler``, all for this problem:

- **Equal compute only.** A value counts at a rung only when it was taken after exactly the rung's
  epochs. Ray judges a report that jumps past a rung at that rung, so a stage ending at 5 epochs
  was compared with values taken at 4, and plans finishing past the last rung set its cutoff with
  longer training. Deciding at stage ends, a trial is therefore judged only where a stage ends on a
  rung; deciding at the rungs, every trial (single-stage plans included) is judged at each rung.

- **Noise margin.** Validation accuracy on a few hundred images is noisy (binomial standard error
  ~2 points at 80% on 503), and a trial below the cutoff by less than that is behind by chance as
  often as not. With ``noise_margin`` z > 0 a trial is stopped only when it is behind the cutoff by
  more than z standard errors of the difference of the two accuracies, sqrt(a(1-a)/n + c(1-c)/n),
  n being the trial's validation size. z = 0 is the stock rule.
- **No decision at a trial's last stage**, where stopping saves nothing, nor for the baselines,
  which a study measures in full; their values are still recorded at their rungs, as a measure of
  what that many epochs buy.

:class:`StageRungs` is the rule alone (no Ray), so that it can be tested with hand-computed cutoffs
and refilled from a study's finished trials when a search resumes; the Tune scheduler that drives
it is :class:`smskd_search.search.scheduler.StageASHAScheduler`.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Iterable
from dataclasses import dataclass

import numpy as np

from smskd_search.stats import difference_se


@dataclass(frozen=True)
class RungDecision:
    """Why a trial was stopped (or kept) at a rung; the searcher stores it on pruned trials."""

    rung: int  # the milestone, in cumulative epochs
    cum_epochs: int  # where the trial was when judged (>= rung)
    value: float
    cutoff: float
    margin: float
    n_recorded: int  # values the cutoff was taken over
    stop: bool

    def describe(self) -> str:
        verdict = "stopped" if self.stop else "kept"
        bar = f"{self.cutoff:.4f}" + (f" - margin {self.margin:.4f}" if self.margin else "")
        return (f"{verdict} at rung {self.rung} (epoch {self.cum_epochs}): val acc {self.value:.4f} "
                f"{'<' if self.stop else '>='} {bar}, the cutoff of {self.n_recorded} trial(s) recorded there")


class StageRungs:
    """The rung bookkeeping and stop rule; see the module docstring."""

    def __init__(self, grace_period: int, reduction_factor: float, max_t: int, noise_margin: float = 0.0):
        if not 0 < grace_period <= max_t:
            raise ValueError(f"grace_period must be in 1..max_t ({max_t}), got {grace_period}")
        if reduction_factor <= 1:
            raise ValueError(f"reduction_factor must be > 1, got {reduction_factor}")
        if noise_margin < 0:
            raise ValueError(f"noise_margin must be >= 0, got {noise_margin}")
        self.reduction_factor = float(reduction_factor)
        self.noise_margin = float(noise_margin)
        self.milestones: list[int] = []
        m = float(grace_period)
        while m <= max_t + 1e-9:
            self.milestones.append(int(round(m)))
            m *= self.reduction_factor
        self._recorded: dict[int, dict[Hashable, float]] = {m: {} for m in self.milestones}

    @property
    def quantile(self) -> float:
        return 1.0 - 1.0 / self.reduction_factor

    def recorded(self, rung: int) -> dict[Hashable, float]:
        return dict(self._recorded[rung])

    def report(self, key: Hashable, cum_epochs: float, value: float, *, n: int | None = None,
               final: bool = False) -> RungDecision | None:
        """One report (a stage end, or a rung inside a stage). Returns the decision taken at a rung,
        or None if none was due."""
        if value is None or math.isnan(value):
            return None
        rung = self._rung_at(cum_epochs)
        if rung is None or key in self._recorded[rung]:
            return None
        others = self._recorded[rung]
        decision = None
        if others:
            cutoff = float(np.percentile(list(others.values()), 100.0 * self.quantile))
            margin = self._margin(value, cutoff, n)
            decision = RungDecision(rung=rung, cum_epochs=int(cum_epochs), value=float(value), cutoff=cutoff,
                                    margin=margin, n_recorded=len(others),
                                    stop=not final and value < cutoff - margin)
        others[key] = float(value)
        return decision

    def replay(self, history: Iterable[tuple[Hashable, list[tuple[int, float]]]]) -> None:
        """Record finished trials' stage values (in the order they ran) without deciding anything.

        A resumed search starts with the rungs as the earlier runs left them.
        """
        for key, stages in history:
            for cum_epochs, value in stages:
                rung = self._rung_at(cum_epochs)
                if rung is not None and key not in self._recorded[rung] and not math.isnan(value):
                    self._recorded[rung][key] = float(value)

    def _rung_at(self, cum_epochs: float) -> int | None:
        """The milestone at exactly these cumulative epochs (None between milestones)."""
        return int(cum_epochs) if cum_epochs == int(cum_epochs) and int(cum_epochs) in self._recorded else None

    def _margin(self, value: float, cutoff: float, n: int | None) -> float:
        if not self.noise_margin or not n:
            return 0.0
        return self.noise_margin * difference_se(value, n, cutoff, n)

    def describe(self) -> str:
        cells = []
        for m in self.milestones:
            vals = list(self._recorded[m].values())
            cut = f"{float(np.percentile(vals, 100.0 * self.quantile)):.4f}" if vals else "-"
            cells.append(f"rung {m}: {len(vals)} recorded, cutoff {cut}")
        return "; ".join(cells)


__all__ = ["RungDecision", "StageRungs"]
