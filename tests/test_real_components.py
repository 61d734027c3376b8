"""The suite's rule for tests that stand for a real component: under ``SMSKD_REQUIRE_REAL=1`` (CI)
their skip fails the run; without it they skip, saying why. Shown on a small test file run by pytest
in a subprocess with the suite's plugin."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from xml.etree import ElementTree

TESTS = Path(__file__).resolve().parent

SAMPLE = '''
import pytest

@pytest.fixture
def cluster():
    pytest.skip("no mount namespace here")

@pytest.mark.real_component("cluster")
def test_marked_skip_in_a_fixture(cluster):
    pass

@pytest.mark.real_component("chromium")
def test_marked_skip_in_the_test():
    pytest.skip("chromium is not installed")

@pytest.mark.real_component("fashion_mnist")
@pytest.mark.skipif(True, reason="Fashion-MNIST not installed")
def test_marked_skipif():
    pass

@pytest.mark.real_component("s3")
def test_marked_that_runs():
    assert True

def test_unmarked_skip():
    pytest.skip("optional")
'''


def _run(folder: Path, require: str | None) -> tuple[int, str, dict[str, str]]:
    """pytest's exit code, its output, and each test's outcome (from its JUnit XML report)."""
    env = {k: v for k, v in os.environ.items() if k not in ("SMSKD_REQUIRE_REAL", "PYTEST_ADDOPTS")}
    if require is not None:
        env["SMSKD_REQUIRE_REAL"] = require
    env["PYTHONPATH"] = os.pathsep.join([str(TESTS), env.get("PYTHONPATH", "")])
    # Its own folder as rootdir: not this project's options (workers) nor its conftest.
    proc = subprocess.run([sys.executable, "-m", "pytest", "-p", "_real_components", "-p", "no:cacheprovider",
                           "-rA", "-q", "--junitxml=report.xml", "test_sample.py"], cwd=folder, env=env,
                          capture_output=True, text=True, timeout=120)
    outcomes = {}
    for case in ElementTree.parse(folder / "report.xml").iter("testcase"):
        said = [c.tag for c in case if c.tag in ("failure", "error", "skipped")]
        outcomes[case.get("name")] = said[0] if said else "passed"
    return proc.returncode, proc.stdout + proc.stderr, outcomes


def test_a_marked_skip_fails_only_where_the_real_components_are_required(tmp_path):
    (tmp_path / "test_sample.py").write_text(SAMPLE)
    (tmp_path / "pytest.ini").write_text("[pytest]\n")

    rc, out, outcomes = _run(tmp_path, None)
    assert rc == 0, out
    assert outcomes == {"test_marked_skip_in_a_fixture": "skipped", "test_marked_skip_in_the_test": "skipped",
                        "test_marked_skipif": "skipped", "test_marked_that_runs": "passed",
                        "test_unmarked_skip": "skipped"}, out
    assert "no mount namespace here" in out and "chromium is not installed" in out  # the reasons are said

    for off in ("", "0"):
        assert _run(tmp_path, off)[2] == outcomes

    rc, out, outcomes = _run(tmp_path, "1")
    assert rc == 1, out
    # A skip in a fixture or a skipif fails the test's setup (an error); one in the test, the test.
    assert outcomes == {"test_marked_skip_in_a_fixture": "error", "test_marked_skip_in_the_test": "failure",
                        "test_marked_skipif": "error", "test_marked_that_runs": "passed",
                        "test_unmarked_skip": "skipped"}, out
    assert ("test_sample.py::test_marked_skip_in_a_fixture stands for the real cluster and skipped under "
            "SMSKD_REQUIRE_REAL=1: Skipped: no mount namespace here") in out
    assert "stands for the real chromium and skipped under SMSKD_REQUIRE_REAL=1: Skipped: chromium is not installed" in out
