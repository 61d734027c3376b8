"""Claims on parts of teacher-logit epochs: one teacher forward for the trials that reach an epoch together.

The teacher-logit store (:mod:`~smskd_search.engine.logit_store`) serves an epoch to every trial
after the first that trained it. Trials that run at once on the same batch stream (the first
trials of a search, packed several to a GPU; a confirmation seed's runs) reach each epoch together
and would each run the teacher over it before any of them had put it. With claims, each claims
parts of the epoch (spans of batches) nobody holds, runs the teacher over them before training the
epoch (:class:`~smskd_search.engine.logit_store.TeacherPass`) and puts them, then reads the parts
the others put (:meth:`~smskd_search.engine.logit_store.LogitStore.shared`): N trials in step each
run the teacher over 1/N of the epoch. On a GPU the teacher's forward is about two thirds of a KD
step's arithmetic.

A claim is a file ``<name>.claim`` beside the store's entries, made with ``O_CREAT | O_EXCL`` (one
process wins, on one machine or on a shared POSIX folder), naming its holder's host and pid, and kept
fresh by its holder (its mtime, every :data:`HEARTBEAT_S`). A waiter goes on when the part appears,
and computes it itself when the claim is released without it, stops being refreshed for
:data:`STALE_S`, or names a process of this machine that has ended (its holder died).
Nothing depends on a claim for its numbers: a stored epoch equals a computed one bit for bit on the
CPU, so a lost race costs only the duplicated forward.

Neither Ray nor Optuna is imported here.
"""

from __future__ import annotations

import os
import socket
import time
import uuid
from collections.abc import Callable
from pathlib import Path

HEARTBEAT_S = 1.0
STALE_S = 30.0
POLL_S = 0.02


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


class Claim:
    """A held claim on one epoch: :meth:`beat` while working on it, :meth:`release` when done."""

    def __init__(self, path: Path, holder: str, heartbeat_s: float = HEARTBEAT_S):
        self.path = path
        self.holder = holder  # the file's line: host, pid and a token of this claim
        self.heartbeat_s = heartbeat_s
        self._last = time.monotonic()

    def beat(self) -> None:
        """Refresh the claim (at most every ``heartbeat_s``; cheap to call per batch)."""
        now = time.monotonic()
        if now - self._last >= self.heartbeat_s:
            self._last = now
            try:
                os.utime(self.path)
            except OSError:  # taken over as stale, or the folder went: the work is still good
                pass

    def release(self) -> None:
        """Remove the claim, unless another took it over as stale meanwhile (then it is theirs)."""
        try:
            if self.path.read_text() == self.holder:
                self.path.unlink()
        except OSError:
            pass


class EpochClaims:
    """Claims on store keys, as files in a local (or shared POSIX) folder.

    Args:
        root: The folder (the teacher-logit store's).
        stale_s: A claim not refreshed for this long is its dead holder's, and may be taken over.
        poll_s: How often a waiter looks for the entry.

    Example:

        >>> import tempfile
        >>> claims = EpochClaims(tempfile.mkdtemp())
        >>> held = claims.claim("k")
        >>> held is not None, claims.claim("k") is None  # a second claimant is refused
        (True, True)
        >>> held.release(); claims.claim("k") is not None
        True
    """

    def __init__(self, root: str | Path, stale_s: float = STALE_S, poll_s: float = POLL_S):
        self.root = Path(root)
        self.stale_s = stale_s
        self.poll_s = poll_s

    def _path(self, key: str) -> Path:
        return self.root / f"{key}.claim"

    def claim(self, key: str) -> Claim | None:
        """The claim on ``key`` if nobody alive holds it (a stale one is taken over), else None."""
        path = self._path(key)
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            if not self._stale(path):
                return None
            try:
                path.unlink(missing_ok=True)
            except OSError:
                return None
            # Another waiter may take it over at the same moment: then both may compute the epoch.
            return self.claim(key)
        except OSError:
            return None  # a folder this process may not write: no claims, the epoch is computed here
        holder = f"{socket.gethostname()} {os.getpid()} {uuid.uuid4().hex[:8]}\n"
        try:
            with os.fdopen(fd, "w") as f:
                f.write(holder)
        except OSError:  # a full disk: no claim (an empty one would hold the others up until stale)
            path.unlink(missing_ok=True)
            return None
        return Claim(path, holder)

    def _stale(self, path: Path) -> bool:
        """Not refreshed for ``stale_s``, or its holder was a process of this machine that has ended
        (a trial killed with its search: a resumed search does not wait out its claims)."""
        try:
            if time.time() - path.stat().st_mtime > self.stale_s:
                return True
            host, pid, _ = path.read_text().split()
        except FileNotFoundError:
            return True
        except (OSError, ValueError):  # being written this instant, or not ours to read: judged by its age
            return False
        return host == socket.gethostname() and not _alive(int(pid))

    def held(self, key: str) -> bool:
        """Whether a live claim on ``key`` exists (a missing file is stale)."""
        return not self._stale(self._path(key))

    def wait(self, key: str, ready: Callable[[], bool]) -> bool:
        """Wait while a live claim on ``key`` exists and ``ready()`` is False; returns ``ready()``.

        ``ready`` says whether the entry is there (its holder put it); False on return means the
        claim was released without it or went stale, and the caller computes the epoch itself.
        """
        while not ready():
            if not self.held(key):
                return ready()
            time.sleep(self.poll_s)
        return True


__all__ = ["Claim", "EpochClaims", "HEARTBEAT_S", "STALE_S"]
