"""--mps: when a search starts an MPS daemon of its own, that Ray's workers get its pipe, and that it
stops after Ray. No GPU here: the control program is a stand-in script that behaves as
``nvidia-cuda-mps-control`` does at its interface (``-d`` forks a daemon that makes the control
pipe; ``quit`` on stdin ends it); the decision runs with CUDA reported present. On a GPU machine
``benchmarks/gpu_throughput.py --mps`` measures packing under the real daemon."""

from __future__ import annotations

import os
import stat
import textwrap
from pathlib import Path

import pytest

from smskd_search.search import mps

FAKE = textwrap.dedent("""\
    #!/bin/bash
    # Stands in for nvidia-cuda-mps-control: -d starts a daemon (the control pipe a plain file here).
    if [ "$1" = "-d" ]; then
      [ -n "$FAKE_MPS_FAIL" ] && { echo "An instance of this daemon is already running" >&2; exit 1; }
      mkdir -p "$CUDA_MPS_PIPE_DIRECTORY"
      echo started >> "$CUDA_MPS_LOG_DIRECTORY/starts.log"
      ( touch "$CUDA_MPS_PIPE_DIRECTORY/control"; echo "$$" > "$CUDA_MPS_PIPE_DIRECTORY/daemon.pid"
        while [ -e "$CUDA_MPS_PIPE_DIRECTORY/control" ]; do sleep 0.05; done ) >/dev/null 2>&1 &
      exit 0
    fi
    read -r command
    if [ "$command" = "get_server_list" ]; then [ -e "$CUDA_MPS_PIPE_DIRECTORY/control" ]; exit $?; fi
    [ "$command" = "quit" ] && rm -f "$CUDA_MPS_PIPE_DIRECTORY/control" && echo "$command" >> "$CUDA_MPS_LOG_DIRECTORY/control.log"
    """)


@pytest.fixture()
def fake_binary(tmp_path, monkeypatch):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    path = bin_dir / mps.BINARY
    path.write_text(FAKE)
    path.chmod(path.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.delenv(mps.PIPE_ENV, raising=False)
    return path


def test_the_search_starts_mps_only_where_it_can_help_and_is_its_own_to_start(fake_binary):
    def why(**kw):
        args = {"cuda": True, "gpus_per_trial": 0.25, "address": None, "environ": {}} | kw
        return mps.mps_blocker(**args)

    assert why() is None
    assert why(cuda=False) == "no CUDA GPU"
    assert why(gpus_per_trial=1.0).startswith("one trial per GPU")
    assert why(gpus_per_trial=0.0) == "the trials ask for no GPU (gpus_per_trial 0)"
    assert why(address="10.0.0.1:6379").startswith("a Ray cluster")
    assert why(environ={mps.PIPE_ENV: "/tmp/nvidia-mps"}).startswith(f"{mps.PIPE_ENV} is set")
    assert why(which=lambda name: None) == f"{mps.BINARY} not found: packed trials share the GPU by time slicing"


def test_a_daemon_starts_with_its_folders_and_stops(fake_binary, tmp_path, monkeypatch):
    daemon = mps.start_mps(tmp_path / "d")
    assert isinstance(daemon, mps.MpsDaemon)
    assert daemon.env == {mps.PIPE_ENV: str(tmp_path / "d" / "pipe"), mps.LOG_ENV: str(tmp_path / "d" / "log")}
    assert (tmp_path / "d" / "pipe" / "control").exists()
    daemon.stop()
    assert not (tmp_path / "d" / "pipe" / "control").exists()
    assert (tmp_path / "d" / "log" / "control.log").read_text() == "quit\n"
    # A search killed under its daemon leaves it running: the resumed search's start takes it over.
    left = mps.start_mps(tmp_path / "k")
    assert isinstance(left, mps.MpsDaemon)
    again = mps.start_mps(tmp_path / "k")
    assert isinstance(again, mps.MpsDaemon) and (tmp_path / "k" / "log" / "starts.log").read_text() == "started\n"
    again.stop()
    assert not (tmp_path / "k" / "pipe" / "control").exists()
    # The folder is the study's: short, and the same for every search of it.
    from smskd_search.search.mps import daemon_folder

    assert daemon_folder(tmp_path, "a") == daemon_folder(tmp_path, "a") != daemon_folder(tmp_path, "b")
    assert len(str(daemon_folder(tmp_path, "a") / "pipe" / "control")) < 100
    # A folder of that name made by another user is not used (it could hand the workers its pipe).
    if os.getuid() == 0:
        taken = tmp_path / "taken"
        taken.mkdir()
        os.chown(taken, 65534, 65534)
        assert mps.start_mps(taken) == f"{taken} belongs to another user: not used"
    # A daemon that will not start is said in one line, with the program's own words.
    monkeypatch.setenv("FAKE_MPS_FAIL", "1")
    assert mps.start_mps(tmp_path / "e") == f"{mps.BINARY} -d exited 1: An instance of this daemon is already running"
    assert mps.start_mps(tmp_path / "f", binary=str(tmp_path / "missing")).startswith(f"{tmp_path / 'missing'} -d: ")


def test_rays_workers_are_the_daemons_clients_and_it_stops_after_ray(fake_binary, monkeypatch):
    import smskd_search.engine.device as device
    from smskd_search.search._ray import ray
    from smskd_search.search.phases import RayHandle

    if ray.is_initialized():
        ray.shutdown()  # the handle must start Ray itself, with the daemon's pipe in its workers' environment
    monkeypatch.setattr(device, "cuda_available", lambda: True)
    from smskd_search.search.mps import daemon_folder

    handle = RayHandle(None, None, mps=True, gpus_per_trial=0.5, mps_folder=daemon_folder(fake_binary.parent, "s"))
    try:
        handle.ensure()
        assert handle._daemon is not None
        folder = handle._daemon.folder
        seen = ray.get(ray.remote(num_cpus=0)(lambda: os.environ.get(mps.PIPE_ENV)).remote())
        assert seen == str(folder / "pipe") and (folder / "pipe" / "control").exists()
        assert handle.mps_note is not None and str(folder) in handle.mps_note
    finally:
        handle.shutdown()
    assert not ray.is_initialized() and not Path(folder).exists()
    # Ray already running in this process: its workers cannot become the daemon's clients, so none is kept.
    from smskd_search.search.cluster import start_ray

    assert start_ray(None)
    try:
        late = RayHandle(None, None, mps=True, gpus_per_trial=0.5, mps_folder=daemon_folder(fake_binary.parent, "t"))
        late.ensure()
        assert late.mps_note == "--mps: no MPS daemon used: Ray was already running in this process"
        assert late._daemon is None and not daemon_folder(fake_binary.parent, "t").exists()
    finally:
        ray.shutdown()
    # One trial per GPU: no daemon, and the note says why.
    single = RayHandle(None, None, mps=True, gpus_per_trial=1.0)
    assert single._start_mps() == {} and single.mps_note == \
        "--mps: no MPS daemon started: one trial per GPU (gpus_per_trial 1): nothing to share"
