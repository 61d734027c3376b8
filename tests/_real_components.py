"""Tests that stand for a real component fail, rather than skip, where the run requires them.

A test marked ``@pytest.mark.real_component("cluster")`` (or ``"s3"``, ``"chromium"``,
``"fashion_mnist"``) is the suite's only evidence that the component works. Locally it may skip,
saying why (no mount namespace, no Chromium); with ``SMSKD_REQUIRE_REAL=1`` in the environment (CI
sets it) such a skip is reported as a failure, so a run cannot pass without the component.

A pytest plugin: tests/conftest.py imports its hooks, and a test of it loads it with ``-p``.
"""

from __future__ import annotations

import os

import pytest

ENV_REQUIRE_REAL = "SMSKD_REQUIRE_REAL"
MARKER = "real_component"


def require_real() -> bool:
    """Whether this run requires the real components (``SMSKD_REQUIRE_REAL`` set, not "0")."""
    return os.environ.get(ENV_REQUIRE_REAL, "") not in ("", "0")


def pytest_configure(config):
    config.addinivalue_line("markers", f"{MARKER}(name): the test stands for a real component; with "
                                       f"{ENV_REQUIRE_REAL}=1 its skip fails the run")


@pytest.hookimpl(hookwrapper=True)  # (the old style: the test extra allows pytest 7.4)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    components = [m.args[0] for m in item.iter_markers(MARKER) if m.args]
    if report.skipped and components and require_real() and not hasattr(report, "wasxfail"):
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        report.outcome = "failed"
        report.longrepr = (f"{item.nodeid} stands for the real {', '.join(sorted(components))} and skipped under "
                           f"{ENV_REQUIRE_REAL}=1: {reason}")
