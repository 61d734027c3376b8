"""The README and docs/ as a user reads them: the quick start activates what it installs, every command
of "Commands" runs as written in a fresh folder (with a tiny budget), the README stays a five-minute
read, every relative link resolves, every plan example is a valid plan, and every command docs/ shows
is either run here (a ``console`` transcript: the command and its exact output) or marked, just above
its block, with why it cannot run here and which test runs it:

    <!-- not run by tests/test_readme.py: needs a Ray cluster; tests/test_cluster.py runs these three commands -->
"""

from __future__ import annotations

import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
import yaml
from conftest import readme_block as _block_after

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"  # (readme_block reads the same file)
DOCS = sorted((ROOT / "docs").glob("*.md"))
BIN = Path(sys.executable).parent
README_MAX_CHARS = 12_000  # a newcomer's five minutes; the details go to docs/
NOT_RUN = re.compile(r"<!-- not run by tests/test_readme\.py: (?P<why>[^;]+); (?P<by>[^>]*?(tests/test_\w+\.py)[^>]*) -->")


def test_the_quick_start_is_two_commands_and_activates_what_it_installs():
    first, second = _block_after("## Quick start")
    # Activation comes before the search, so that "Commands" below runs as typed after it.
    assert re.search(r"\. \.venv/bin/activate && .*pip install -e \. && smskd-search --budget 50$", first), first
    assert second.endswith("python -m pytest -q") and '.[test]"' in second
    ci = (ROOT / ".ci" / "run").read_text()
    assert '.venv/bin/pip install -q -e ".[test]"' in ci and ".venv/bin/python -m pytest -q" in ci


def test_the_readme_is_a_five_minute_read():
    text = README.read_text()
    assert len(text) <= README_MAX_CHARS, f"README.md has {len(text)} characters; move details to docs/"
    assert DOCS, "no docs/ pages"
    linked = set(re.findall(r"\]\((docs/[^)#]+)", text))
    assert linked == {f"docs/{p.name}" for p in DOCS}, "the README links every docs/ page (and no missing one)"


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def test_every_relative_link_resolves():
    for page in [README, *DOCS]:
        for target in re.findall(r"\]\(([^)\s]+)\)", page.read_text()):
            if re.match(r"[a-z]+:", target):
                continue  # http(s), mailto: not checked offline
            path, _, anchor = target.partition("#")
            dest = (page.parent / path).resolve() if path else page
            assert dest.is_file(), f"{page.relative_to(ROOT)}: link {target!r}: no file {dest}"
            if anchor and dest.suffix == ".md":
                headings = re.findall(r"^#+ (.+)$", dest.read_text(), re.M)
                assert anchor in {_slug(h) for h in headings}, f"{page.relative_to(ROOT)}: link {target!r}: no such heading"


def test_every_plan_example_is_a_valid_plan():
    from smskd_search.validate import parse_plan

    examples = [(page, block) for page in [README, *DOCS]
                for block in re.findall(r"```yaml\n(.*?)```", page.read_text(), re.S) if block.startswith("version:")]
    assert any(page == README for page, _ in examples), "the README shows a plan"
    for page, block in examples:
        plan = parse_plan(yaml.safe_load(block), str(page.relative_to(ROOT)))
        assert plan.stages, page


def _blocks(page: Path, lang: str) -> list[tuple[str, str]]:
    """Each ``lang`` block of ``page`` with the line just above its opening fence."""
    return re.findall(rf"([^\n]*)\n```{lang}\n(.*?)```", page.read_text(), re.S)


def test_docs_commands_are_run_here_or_say_which_test_runs_them():
    marked = 0
    for page in DOCS:
        for above, block in _blocks(page, "bash"):
            note = NOT_RUN.fullmatch(above.strip())
            assert note, (f"{page.relative_to(ROOT)}: a bash block without the line "
                          f"'<!-- not run by tests/test_readme.py: WHY; tests/test_X.py runs it -->' above it:\n{block}")
            assert (ROOT / note.group(3)).is_file(), f"{page.relative_to(ROOT)}: {note.group(3)} does not exist"
            marked += 1
    assert marked >= 3, "the cluster, S3 and GPU commands are marked"


def _env(tmp_path: Path) -> dict[str, str]:
    # What `. .venv/bin/activate` gives a shell: the venv's scripts first on PATH.
    env = {k: v for k, v in os.environ.items() if not k.startswith("SMSKD_")}
    env.update(PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}", RAY_AUTH_MODE="disabled", HOME=str(tmp_path / "home"))
    return env


def _needs_the_script() -> None:
    if not (BIN / "smskd-search").is_file():
        pytest.skip(f"no smskd-search script beside {sys.executable} (install the project with pip install -e .)")


def test_docs_transcripts_run_as_shown(tmp_path):
    """A ``console`` block is ``$ command`` lines, each followed by its exact output. An output that
    starts with ``error:`` is bad input: exit 2, and nothing written in the folder it ran in."""
    _needs_the_script()
    shown = [(page, block) for page in DOCS for _, block in _blocks(page, "console")]
    assert shown, "docs/cluster.md shows the refused --address"
    env = _env(tmp_path)
    for k, (page, block) in enumerate(shown):
        for typed, expected in re.findall(r"^\$ (.+)\n((?:(?!\$ ).*\n)*)", block, re.M):
            cwd = tmp_path / f"fresh{k}"
            cwd.mkdir(exist_ok=True)
            done = subprocess.run(typed, shell=True, cwd=cwd, env=env, capture_output=True, text=True, timeout=120)
            assert (done.stdout + done.stderr).strip() == expected.strip(), f"{page.name}: {typed}\n{done.stdout}{done.stderr}"
            if expected.startswith("error:"):
                assert done.returncode == 2 and not any(cwd.iterdir()), (typed, done.returncode, list(cwd.iterdir()))
            else:
                assert done.returncode == 0, (typed, done.returncode)


@pytest.mark.slow
def test_the_commands_run_as_written(tmp_path):
    _needs_the_script()
    commands = _block_after("## Commands")
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
    """The dashboard command as typed, on its default port 8080, which this machine need not have free
    (another program, or a dashboard the user left open). Only when the typed command cannot have its
    port (the CLI refuses a port in use, or the dashboard exits before serving because something took
    the port in between) it runs again with ``--port`` added, on a port the kernel just gave out as free.
    That port is released before the child binds it, so it can be taken in between too: then the same
    happens again, a few times. The answer must come from our child (still running, listing the fresh
    folder's study), so a server someone else has on the port cannot pass for it."""
    for attempt in range(5):
        tried = cmd if attempt == 0 else f"{cmd} --port {_port_free_now()}"
        if _serve_once(tried, cwd, env):
            return
    raise AssertionError(f"{cmd}: no port could be had in 5 attempts")


def _port_free_now() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _serve_once(cmd: str, cwd: Path, env: dict[str, str]) -> bool:
    """True when the dashboard served the study; False when its port was in use (try another)."""
    proc = subprocess.Popen(shlex.split(cmd), cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline() if proc.stdout else ""
        url = re.search(r"(http://\S+)", line)
        deadline, status, body = time.time() + 60, None, ""
        while url and time.time() < deadline and status is None and proc.poll() is None:
            try:
                with urllib.request.urlopen(urllib.parse.urljoin(url.group(1), "/api/studies"), timeout=5) as r:
                    status, body = r.status, r.read().decode()
            except OSError:
                time.sleep(0.5)
        if not url:
            proc.wait(timeout=60)  # refused: its stdout closed as it exits
        if proc.poll() is not None:
            err = proc.stderr.read() if proc.stderr else ""
            assert "in use" in err.lower(), f"{cmd} exited {proc.returncode}:\n{line}{err[-2000:]}"
            return False
        assert status == 200 and '"default"' in body, (status, line, body[:500])
        return True
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
            assert proc.wait(timeout=30) == 0
