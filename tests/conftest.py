"""Shared fixtures: small digits problems and one teacher cache per test session."""

from __future__ import annotations

import os
import re
from pathlib import Path

os.environ.setdefault("RAY_AUTH_MODE", "disabled")

import pytest
import torch

from smskd_search.plan import DatasetSpec, Plan, ProblemSpec, RecipeSpec, StudentSpec, TeacherRecipe, TeacherSpec
from smskd_search.space import Space
from smskd_search.space import make_plan as build_plan


@pytest.fixture(autouse=True)
def _one_thread():
    # CPU numbers depend on the thread count; pin it so that equality tests mean something.
    torch.set_num_threads(1)
    yield


@pytest.fixture(scope="session")
def teacher_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("teachers")


@pytest.fixture(scope="session")
def tiny_problem() -> ProblemSpec:
    """Digits with a quickly trained teacher (3 epochs): for tests of mechanics, not of accuracy."""
    return ProblemSpec(
        dataset=DatasetSpec(name="digits", val_fraction=0.35, test_fraction=0.2),
        teacher=TeacherSpec(arch="cnn_small", recipe=TeacherRecipe(epochs=3, lr=0.05)),
        student=StudentSpec(arch="cnn_nano"),
    )


def make_plan(problem: ProblemSpec, stages: list[tuple[str, int]], **kw) -> Plan:
    """The library's plan builder on a space of just this problem (recipe lr 0.05 unless given)."""
    space = Space(name="test", problem=problem, recipe=kw.pop("recipe", RecipeSpec(lr=0.05)))
    plan = build_plan(space, stages, name=kw.pop("name", "plan"), seed=kw.pop("seed", None),
                      **kw.pop("reference", {}))
    return plan.model_copy(update=kw) if kw else plan


README = Path(__file__).resolve().parent.parent / "README.md"


def readme_block(heading: str, nth: int = 0) -> list[str]:
    """The commands of the ``nth`` bash block after ``heading`` in the README: comments dropped,
    continuations joined (the README's commands are tested as typed)."""
    text = README.read_text()
    start = text.index(heading)
    blocks = re.findall(r"```bash\n(.*?)```", text[start:], re.S)
    assert len(blocks) > nth, f"no bash block {nth} after {heading!r}"
    commands, pending = [], ""
    for raw in blocks[nth].splitlines():
        line = re.sub(r"\s+#.*$", "", raw).rstrip()
        if line.endswith("\\"):
            pending += line[:-1].strip() + " "
            continue
        if pending + line.strip():
            commands.append(pending + line.strip())
        pending = ""
    return commands
