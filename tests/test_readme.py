"""The README's commands as a user types them: the quick start activates what it installs, and every
command of "What you can do" runs as written in a fresh folder (with a tiny budget)."""

from __future__ import annotations

import os
import re
import shlex
import signal
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
import yaml
from conftest import readme_block as _block_after

README = Path(__file__).resolve().parent.parent / "README.md"  # (readme_block reads the same file)
BIN = Path(sys.executable).parent


def test_the_quick_start_is_two_commands_and_activates_what_it_installs():
    first, second = _block_after("## Quick start")
    # Activation comes before the search, so that "What you can do" below runs as typed after it.
    assert re.search(r"\. \.venv/bin/activate && .*pip install -e \. && smskd-search --budget 50$", first), first
    assert second.endswith("python -m pytest -q") and '.[test]"' in second
    ci = (README.parent / ".ci" / "run").read_text()
    assert '.venv/bin/pip install -q -e ".[test]"' in ci and ".venv/bin/python -m pytest -q" in ci


def _env(tmp_path: Path) -> dict[str, str]:
    # What `. .venv/bin/activate` gives a shell: the venv's scripts first on PATH.
    env = {k: v for k, v in os.environ.items() if not k.startswith("SMSKD_")}
    env.update(PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}", RAY_AUTH_MODE="disabled", HOME=str(tmp_path / "home"))
    return env


@pytest.mark.slow
def test_what_you_can_do_runs_as_written(tmp_path):
    if not (BIN / "smskd-search").is_file():
        pytest.skip(f"no smskd-search script beside {sys.executable} (install the project with pip install -e .)")
    commands = _block_after("## What you can do")
    assert len(commands) >= 12, commands
    env, cwd = _env(tmp_path), tmp_path / "fresh"
    cwd.mkdir()
    ran: list[str] = []
    for typed in commands:
        if "--address auto" in typed:
            # Needs a running Ray cluster: the cluster tests (issue "A real Ray cluster") cover it.
            continue
        cmd = typed.replace("--budget 50", "--budget 3")
        if cmd.startswith("smskd-search dashboard"):
            _check_dashboard(cmd, cwd, env)
        else:
            done = subprocess.run(cmd, shell=True, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
            assert done.returncode == 0, f"{typed}\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}"
            _check_output(cmd, done.stdout, cwd)
        ran.append(typed)
    assert len(ran) == len(commands) - 1, "only the cluster command may be left out"


def _check_output(cmd: str, out: str, cwd: Path) -> None:
    """What each command must have done, beyond exiting 0."""
    studies = cwd / "studies"
    if cmd == "smskd-search --budget 3":
        assert (studies / "default.db").is_file() and (studies / "default" / "best.yaml").is_file()
        assert "training the teacher cnn_large" in out and "recommended" in out.lower(), out[-1500:]
    elif "--study again" in cmd:
        assert (studies / "again.db").is_file()
    elif cmd == "smskd-search studies":
        assert re.search(r"^\s*default\b", out, re.M) and re.search(r"^\s*again\b", out, re.M), out
    elif cmd.startswith("smskd-search export"):
        for k in (1, 2, 3):
            plan = yaml.safe_load((studies / "default" / "plans" / f"rank{k}.yaml").read_text())
            assert plan["version"] == 1 and plan["stages"], plan
    elif cmd.startswith("smskd-search train studies/"):
        assert re.search(r"test acc [\d.]+% \(n=360, s\.e\. [\d.]+ points\)", out), out[-1500:]
    elif cmd.startswith("smskd-search verify"):
        assert "paired" in out.lower() and re.search(r"\bkd\b", out), out[-1500:]
    elif cmd.startswith("smskd-search report"):
        assert (studies / "default" / "report.html").stat().st_size > 10_000
    elif cmd.startswith("smskd-search teacher"):
        assert out.startswith("cache hit: teacher cnn_large"), out  # trained once, by the first search
    elif cmd.startswith("smskd-search train --method"):
        assert re.search(r"test acc [\d.]+% \(n=360, s\.e\. [\d.]+ points\)", out), out[-1500:]
    elif cmd == "smskd-search methods":
        assert all(re.search(rf"^\s*{m}\b", out, re.M) for m in ("kd", "dkd", "fitnet", "crd")), out
    else:
        raise AssertionError(f"a README command without a check here: {cmd!r}")


def _check_dashboard(cmd: str, cwd: Path, env: dict[str, str]) -> None:
    proc = subprocess.Popen(shlex.split(cmd), cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline() if proc.stdout else ""
        url = re.search(r"(http://\S+)", line)
        assert url, line + (proc.stderr.read() if proc.poll() is not None and proc.stderr else "")
        deadline, status = time.time() + 60, None
        while time.time() < deadline and status is None:
            try:
                with urllib.request.urlopen(urllib.parse.urljoin(url.group(1), "/api/studies"), timeout=5) as r:
                    status, body = r.status, r.read().decode()
            except OSError:
                time.sleep(0.5)
        assert status == 200 and '"default"' in body, (status, line)
    finally:
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=30) == 0
