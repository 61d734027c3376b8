"""Ports for the tests' servers, without check-then-use races.

A port found free and closed again may be taken by anything before the server binds it. So: a port
that must refuse connections is held bound (never listening) for as long as it is needed, and a
server that must bind a port of its own is started again on another port when its bind fails.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TypeVar

T = TypeVar("T")


class PortTaken(Exception):
    """Raised by a server's start function when the port it was given was taken meanwhile."""


@contextmanager
def refused_port(host: str = "127.0.0.1") -> Iterator[int]:
    """A port on ``host`` that refuses every connection while the block runs.

    The socket is bound, so nothing else can take the port, and never listens, so a connection to
    it is refused at once.
    """
    with socket.socket() as s:
        s.bind((host, 0))
        yield s.getsockname()[1]


def _session(pid: str) -> int | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            # The fields after the command's ")" (which may hold spaces): state, ppid, pgrp, session.
            return int(f.read().rsplit(")", 1)[1].split()[3])
    except (OSError, IndexError, ValueError):
        return None


def listens(session: int, port: int) -> bool:
    """Whether a process of ``session`` (a server started with ``start_new_session=True``: its pid)
    listens on TCP ``port`` (Linux's /proc): whatever answers on the port may be another
    server that took it first."""
    owned = set()
    for pid in (p for p in os.listdir("/proc") if p.isdigit()):
        if _session(pid) != session:
            continue
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            continue
        for fd in fds:
            try:
                owned.add(os.readlink(f"/proc/{pid}/fd/{fd}"))
            except OSError:
                continue
    rows = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):  # (a server on [::] is listed in tcp6 alone)
        with open(table) as f:
            rows += [line.split() for line in f.readlines()[1:]]
    return any(int(r[1].rsplit(":", 1)[1], 16) == port and r[3] == "0A" and f"socket:[{r[9]}]" in owned
               for r in rows)


def bindable(port: int, host: str = "127.0.0.1") -> bool:
    """Whether ``port`` is free now (a server that exited before listening: was it taken?)."""
    with socket.socket() as s:
        try:
            s.bind((host, port))
        except OSError:
            return False
        return True


def _unbound_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def start_on_a_free_port(start: Callable[[int], T], host: str = "127.0.0.1", attempts: int = 5) -> tuple[T, int]:
    """Start a server on a free port, on another one each time it raises :class:`PortTaken`.

    Args:
        start: Starts the server on the port and returns once it is ready; raises
            :class:`PortTaken` when the server could not bind it (it must have cleaned up).
        host: The interface the port is free on.
        attempts: How many ports to try.

    Returns:
        What ``start`` returned, and the port.
    """
    taken = []
    for _ in range(attempts):
        port = _unbound_port(host)
        try:
            return start(port), port
        except PortTaken:
            taken.append(port)
    raise RuntimeError(f"no server started: ports {taken} were each taken before it bound them")
