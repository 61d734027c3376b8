"""The library a notebook imports: one place for the public names, and docstring examples that run."""

from __future__ import annotations

import doctest
import importlib
import subprocess
import sys

import pytest

import smskd_search

# Modules whose docstring examples run here (examples that need a trained teacher or Ray are
# marked ``+SKIP`` in place and shown for reading).
DOCTESTED = [
    "smskd_search",
    "smskd_search.stats",
    "smskd_search.plan",
    "smskd_search.space",
    "smskd_search.search_settings",
    "smskd_search.search.trial_report",
    "smskd_search.search.searcher",
    "smskd_search.search.cluster",
    "smskd_search.search.teacher_task",
    "smskd_search.search.trainable",
    "smskd_search.data.download",
]


def test_every_public_name_resolves_to_its_definition():
    from smskd_search.engine import run_plan
    from smskd_search.space import make_plan
    from smskd_search.validate import load_plan

    assert smskd_search.run_plan is run_plan and smskd_search.make_plan is make_plan
    assert smskd_search.load_plan is load_plan
    for name in smskd_search.__all__:
        assert getattr(smskd_search, name).__doc__, f"smskd_search.{name} has no docstring"
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        smskd_search.nope  # noqa: B018


def test_importing_the_package_imports_neither_torch_nor_ray():
    # The command line answers a bad flag without waiting for torch.
    code = "import sys, smskd_search; print('torch' in sys.modules, 'ray' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         timeout=120).stdout
    assert out.split() == ["False", "False"]


@pytest.mark.parametrize("name", DOCTESTED)
def test_docstring_examples_run(name):
    result = doctest.testmod(importlib.import_module(name), optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0
