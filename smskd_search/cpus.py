"""The CPUs this process may use: its affinity where the OS has one (a batch scheduler or
``taskset`` narrows it), else every CPU of the machine."""

from __future__ import annotations

import os


def usable_cpus() -> int:
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return max(1, os.cpu_count() or 1)
