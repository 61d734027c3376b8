"""Is anything listening at host:port? One TCP connection, answered in words for an error line."""

from __future__ import annotations

import socket


def unreachable(where: tuple[str, int], timeout: float) -> str | None:
    """Why nothing answers at ``where`` ("connection refused", "timed out", ...), or None if it answers."""
    try:
        with socket.create_connection(where, timeout=timeout):
            return None
    except OSError as exc:
        return "timed out" if isinstance(exc, TimeoutError) else (exc.strerror or type(exc).__name__).lower()
