"""NVIDIA MPS for trials packed on one GPU (``smskd-search --mps``, opt-in until measured).

Trials packed on a GPU (``gpus_per_trial`` below 1) are separate processes, each with its own CUDA
context: the GPU time-slices between them, and kernels of two trials never run at once. Under the
Multi-Process Service their kernels share the GPU concurrently, which is what small, launch-bound
steps need to fill it. With ``--mps`` the search starts a control daemon of its own before Ray
(``nvidia-cuda-mps-control -d``, its pipe and log folders in a temporary folder named after the
study), hands the workers its pipe folder, and stops it after Ray (``quit`` on its control pipe); a
search resumed after a kill takes over the daemon the killed one left, and stops it in the end. It
does nothing, and the summary says why, where MPS cannot help or is not this search's to start: no
CUDA GPU, trials that ask no GPU or a whole one, a Ray cluster (its nodes are not this machine), a
daemon the machine already runs (``CUDA_MPS_PIPE_DIRECTORY`` set: the workers use it as it is), no
``nvidia-cuda-mps-control``.

Neither CUDA nor Ray is imported here.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

BINARY = "nvidia-cuda-mps-control"
PIPE_ENV, LOG_ENV = "CUDA_MPS_PIPE_DIRECTORY", "CUDA_MPS_LOG_DIRECTORY"
START_TIMEOUT_S = 10.0


def mps_blocker(*, cuda: bool, gpus_per_trial: float, address: str | None, environ: Mapping[str, str],
                which: Callable[[str], str | None] = shutil.which) -> str | None:
    """Why this search does not start an MPS daemon (None: it does).

    Example:

        >>> mps_blocker(cuda=True, gpus_per_trial=1.0, address=None, environ={})
        'one trial per GPU (gpus_per_trial 1): nothing to share'
        >>> mps_blocker(cuda=True, gpus_per_trial=0.25, address=None, environ={}, which=lambda name: None)
        'nvidia-cuda-mps-control not found: packed trials share the GPU by time slicing'
    """
    if not cuda:
        return "no CUDA GPU"
    if not gpus_per_trial > 0:
        return "the trials ask for no GPU (gpus_per_trial 0)"
    if not gpus_per_trial < 1:
        return f"one trial per GPU (gpus_per_trial {gpus_per_trial:g}): nothing to share"
    if address is not None:
        return "a Ray cluster: start MPS on its GPU nodes yourself (CUDA_MPS_PIPE_DIRECTORY in the workers' environment)"
    if environ.get(PIPE_ENV):
        return f"{PIPE_ENV} is set: the machine's own daemon serves the trials"
    if which(BINARY) is None:
        return f"{BINARY} not found: packed trials share the GPU by time slicing"
    return None


@dataclass
class MpsDaemon:
    """An MPS control daemon this search started; :meth:`stop` ends it.

    Args:
        binary: The control program it was started with.
        folder: Its pipe (``pipe/``) and log (``log/``) folders' parent.
    """

    binary: str
    folder: Path

    @property
    def env(self) -> dict[str, str]:
        """What a CUDA process needs to be its client."""
        return {PIPE_ENV: str(self.folder / "pipe"), LOG_ENV: str(self.folder / "log")}

    def send(self, command: str) -> bool:
        """One command on the daemon's control pipe; whether the control program answered it."""
        try:
            done = subprocess.run([self.binary], input=f"{command}\n", text=True, env={**os.environ, **self.env},
                                  capture_output=True, timeout=START_TIMEOUT_S, check=False)
        except (OSError, subprocess.TimeoutExpired):
            return False
        return done.returncode == 0

    def stop(self) -> None:
        """Quit the daemon (its clients, Ray's workers, are gone by now); quiet if it has gone already."""
        self.send("quit")


def daemon_folder(studies_dir: Path, study: str) -> Path:
    """The pipe and log folders' parent for a study's searches: short (the control pipe is a Unix
    socket, 108 bytes at most) and the same for each search of the study, so that a search resumed after
    a kill finds the daemon the killed one left and stops it in the end."""
    tag = hashlib.sha256(f"{studies_dir.absolute()}\n{study}".encode()).hexdigest()[:12]
    return Path(tempfile.gettempdir()) / f"smskd-mps-{tag}"


def start_mps(folder: Path, binary: str = BINARY) -> MpsDaemon | str:
    """Start a control daemon with its pipe and logs under ``folder`` (or take the one a killed search
    left there); the daemon, or why it did not start.

    Args:
        folder: The study's folder (:func:`daemon_folder`; made here).
        binary: The control program (a path or a name on PATH).
    """
    daemon = MpsDaemon(binary, folder.absolute())
    # The folder's name is predictable: it must be this user's alone, or another could hand the
    # workers a pipe of theirs.
    daemon.folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    if daemon.folder.stat().st_uid != os.getuid():
        return f"{daemon.folder} belongs to another user: not used"
    daemon.folder.chmod(0o700)
    for sub in ("pipe", "log"):
        (daemon.folder / sub).mkdir(exist_ok=True)
    # A daemon listening there (it lists its servers) is one a killed search of the study left.
    if (daemon.folder / "pipe" / "control").exists() and daemon.send("get_server_list"):
        return daemon
    try:
        done = subprocess.run([binary, "-d"], env={**os.environ, **daemon.env}, capture_output=True, text=True,
                              timeout=START_TIMEOUT_S, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"{binary} -d: {exc}"
    if done.returncode != 0:
        why = (done.stderr or done.stdout).strip().splitlines()
        return f"{binary} -d exited {done.returncode}" + (f": {why[-1]}" if why else "")
    # The daemon forks and returns at once; it answers once its control pipe exists.
    deadline = time.monotonic() + START_TIMEOUT_S
    while not (daemon.folder / "pipe" / "control").exists():
        if time.monotonic() > deadline:
            daemon.stop()
            return f"{binary} -d: no control pipe in {daemon.folder / 'pipe'} after {START_TIMEOUT_S:g} s"
        time.sleep(0.05)
    return daemon


__all__ = ["BINARY", "MpsDaemon", "daemon_folder", "mps_blocker", "start_mps"]
