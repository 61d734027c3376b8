"""Helpers shared by the benchmark scripts: machine description, interleaved timing, tables.

Every benchmark here measures our code and its baseline side by side in one process (or one run),
alternating them round by round (ABAB..., the order flipped every other round), so that a machine
shared with other jobs slows both alike; it reports medians over rounds and the ratio of medians,
plus the median of the per-round ratios (robust to slow drifts of the machine's load).
"""

from __future__ import annotations

import datetime as _dt
import os
import platform
import statistics
import time
from collections.abc import Callable, Sequence

import torch


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine_line(device: torch.device | None = None) -> str:
    parts = [
        f"date {_dt.datetime.now().isoformat(timespec='seconds')}",
        f"CPU {cpu_model()}",
        f"cores {os.cpu_count()}",
        f"torch {torch.__version__}",
        f"torch threads {torch.get_num_threads()}",
    ]
    if device is not None and device.type == "cuda":
        parts.append(f"GPU {torch.cuda.get_device_name(device)}")
        parts.append(f"CUDA {torch.version.cuda}")
    return " | ".join(parts)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def interleave(contenders: dict[str, Callable[[], float]], rounds: int, warmup: int = 1) -> dict[str, list[float]]:
    """Run each contender once per round, order flipped every other round; return per-round values.

    A contender is a callable returning the value it measured (seconds, or images/s): it does its own
    synchronisation so that the value is the real elapsed time of its work.
    """
    names = list(contenders)
    for _ in range(warmup):
        for name in names:
            contenders[name]()
    out: dict[str, list[float]] = {n: [] for n in names}
    for r in range(rounds):
        order = names if r % 2 == 0 else list(reversed(names))
        for name in order:
            out[name].append(contenders[name]())
    return out


def median(xs: Sequence[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def paired_ratio(num: Sequence[float], den: Sequence[float]) -> float:
    """Median of per-round ratios num[i] / den[i]."""
    return median([a / b for a, b in zip(num, den) if b > 0])


def spread(xs: Sequence[float]) -> str:
    """min..max of the rounds, to show the noise."""
    if not xs:
        return "-"
    return f"{_fmt(float(min(xs)))}..{_fmt(float(max(xs)))}"


def table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    cells = [[str(h) for h in headers]] + [[_fmt(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = []
    for j, row in enumerate(cells):
        lines.append("| " + " | ".join(c.ljust(widths[i]) for i, c in enumerate(row)) + " |")
        if j == 0:
            lines.append("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)


def _fmt(c: object) -> str:
    if isinstance(c, float):
        if c != c:
            return "-"
        if abs(c) >= 1000:
            return f"{c:,.0f}"
        if abs(c) >= 10:
            return f"{c:.1f}"
        return f"{c:.3g}"
    return str(c)


class Stopwatch:
    """Wall time of a block, synchronised with the device at both ends."""

    def __init__(self, device: torch.device):
        self.device = device
        self.seconds = 0.0

    def __enter__(self) -> Stopwatch:
        sync(self.device)
        self._t0 = time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        sync(self.device)
        self.seconds = time.perf_counter() - self._t0
