"""Shared fixtures: small digits problems and one teacher cache per test session."""

from __future__ import annotations

import os

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


@pytest.fixture(scope="module")
def local_ray():
    """One local Ray for a module's in-process searches, started as the tool starts it.

    Each start costs about 10 s on 2 cores, and ``run_search`` leaves a Ray it did not start
    running. The workers see the environment of the module's start (its autouse fixtures set
    theirs first). The CLI tests start their own Ray, as a user's command does.
    """
    from smskd_search.search._ray import ray
    from smskd_search.search.cluster import start_ray

    started = start_ray(None)
    yield
    if started:
        ray.shutdown()


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
