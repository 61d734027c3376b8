"""Freeze a process tree, look at what it left, then kill it or let it go on.

A hard-kill test must kill a search in a definite state (a trial with a stage checkpoint and no
result yet), not after a sleep that hopes the next stage has not finished. Polling for the state and
killing on seeing it still races the trial; freezing the search first (SIGSTOP to the driver and
every process below it, Ray's included) stops it where it is, so that what the test reads before the
kill is what the kill leaves.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable


def _stat(pid: int) -> tuple[str, int, int] | None:
    """(state, parent pid, session) of a process, or None where it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()  # after the command, which may hold spaces
    except (OSError, IndexError):
        return None
    return fields[0], int(fields[1]), int(fields[3])


def tree(root: int) -> set[int]:
    """``root``, every process below it, and every process of its session (``root`` started with
    ``start_new_session=True``), by Linux's /proc."""
    stats = {}
    for name in os.listdir("/proc"):
        if name.isdigit() and (s := _stat(int(name))) is not None:
            stats[int(name)] = s
    found, grew = {root}, True
    while grew:
        below = {pid for pid, (_, ppid, sid) in stats.items() if ppid in found or sid == root} - found
        found |= below
        grew = bool(below)
    return found


def freeze(root: int, timeout: float = 30) -> set[int]:
    """SIGSTOP ``root``'s tree until no process of it runs; returns the frozen processes.

    A process forked while the tree was being stopped is found and stopped on the next pass (its
    parent, stopped, forks no more).
    """
    frozen: set[int] = set()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        new = tree(root) - frozen
        for pid in new:
            try:
                os.kill(pid, signal.SIGSTOP)
            except ProcessLookupError:
                pass
        frozen |= new
        # Stopped means stopped: state T (or gone, or a zombie), not merely signalled.
        if not new and all((s := _stat(pid)) is None or s[0] in "TtZX" for pid in frozen):
            return frozen
        time.sleep(0.05)
    raise TimeoutError(f"processes of {root} did not stop within {timeout} s")


def send(pids: set[int], sig: int) -> None:
    for pid in pids:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass


def kill_in_state(root: int, ready: Callable[[], bool], confirmed: Callable[[], bool], finished: Callable[[], bool],
                  timeout: float = 300, poll: float = 0.2) -> bool:
    """SIGKILL ``root``'s tree once it is frozen in a state that ``confirmed()`` accepts.

    Args:
        root: The process (a session leader) whose tree to kill.
        ready: Cheap; True when the state may have come (then the tree is frozen and checked).
        confirmed: Read while the tree is frozen: True kills it there; False lets it go on.
        finished: True when the state cannot come any more (the run is over): gives up.
        timeout: Seconds to wait for the state.
        poll: Seconds between two looks.

    Returns:
        Whether it was killed in the confirmed state (False: finished or timed out, left running).
    """
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and not finished():
        if ready():
            frozen = freeze(root)
            if confirmed():
                send(frozen, signal.SIGKILL)
                return True
            send(frozen, signal.SIGCONT)
        time.sleep(poll)
    return False
