"""Shared fixtures: small digits problems and one teacher cache per test session."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

os.environ.setdefault("RAY_AUTH_MODE", "disabled")

import pytest
import torch
from _ports import PortTaken, bindable, listens, start_on_a_free_port
from _real_components import pytest_configure, pytest_runtest_makereport  # noqa: F401 - hooks of this suite

from smskd_search.plan import DatasetSpec, Plan, ProblemSpec, RecipeSpec, StudentSpec, TeacherRecipe, TeacherSpec
from smskd_search.space import Space
from smskd_search.space import make_plan as build_plan

# The files that take longest (minutes: real searches, clusters, the README's commands), first: the
# two workers of `-n 2 --dist loadfile` take files in this order, and a long file started last would
# leave the other worker idle at the end.
SLOWEST_FIRST = ("test_readme.py", "test_search.py", "test_winners.py", "test_cluster.py", "test_inspect.py", "test_gpu_check.py",
                 "test_s3_storage.py", "test_teacher.py")


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(SLOWEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: within a file, as written


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


@pytest.fixture()
def shared(tiny_problem, teacher_cache):
    """The tiny problem's data and teacher, loaded once, as the search hands them to run_plan."""
    from smskd_search.data import load_data
    from smskd_search.engine import ensure_teacher, load_teacher

    data = load_data(tiny_problem.dataset, "cpu")
    record = ensure_teacher(tiny_problem, cache_root=teacher_cache, data=data)
    model = load_teacher(tiny_problem, record, data.info, "cpu")
    return {"data": data, "teacher_model": model, "teacher_record": record}


def make_plan(problem: ProblemSpec, stages: list[tuple[str, int]], **kw) -> Plan:
    """The library's plan builder on a space of just this problem (recipe lr 0.05 unless given)."""
    space = Space(name="test", problem=problem, recipe=kw.pop("recipe", RecipeSpec(lr=0.05)))
    plan = build_plan(space, stages, name=kw.pop("name", "plan"), seed=kw.pop("seed", None),
                      **kw.pop("reference", {}))
    return plan.model_copy(update=kw) if kw else plan


README = Path(__file__).resolve().parent.parent / "README.md"


def readme_block(heading: str, nth: int = 0, page: str = "README.md") -> list[str]:
    """The commands of the ``nth`` bash block after ``heading`` in the README or one of its docs/
    pages (``page``, relative to the repository root): comments dropped, continuations joined (the
    documented commands are tested as typed)."""
    text = (README.parent / page).read_text()
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


# ------------------------------------------------------------------ an S3-compatible server
S3_CREDENTIALS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}


def _start_moto(port: int, log: Path) -> subprocess.Popen:
    """moto's server on ``port``, once it listens there itself and answers (not another server that
    holds the port); raises PortTaken where the port was taken before it bound it."""
    with open(log, "wb") as err:
        proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                                stdout=subprocess.DEVNULL, stderr=err, start_new_session=True)
    deadline = time.monotonic() + 60
    while proc.poll() is None and time.monotonic() < deadline:
        if not listens(proc.pid, port):
            time.sleep(0.2)
            continue
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/moto-api/data.json", timeout=2) as r:
                json.load(r)
            return proc
        except (OSError, ValueError):
            time.sleep(0.2)
    _stop(proc)
    if not bindable(port):
        raise PortTaken(port)
    said = log.read_text(errors="replace")
    pytest.fail(f"moto's server did not start on port {port}: {said[-2000:]}")


def _stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=30)


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    """An S3-compatible server (moto's server mode) on a free port; yields its ``host:port``."""
    pytest.importorskip("moto.server", reason="moto is not installed: pip install 'moto[server]' (the test extra)")
    pytest.importorskip("boto3", reason="boto3 is not installed: pip install 'moto[server]' (the test extra)")
    log = tmp_path_factory.mktemp("moto") / "server.log"
    proc, port = start_on_a_free_port(lambda p: _start_moto(p, log))
    try:
        yield f"127.0.0.1:{port}"
    finally:
        _stop(proc)


def s3_bucket(endpoint: str, name: str):
    """A new bucket on the server; returns a boto3 client of it."""
    import boto3

    client = boto3.client("s3", endpoint_url=f"http://{endpoint}", **{
        "aws_access_key_id": S3_CREDENTIALS["AWS_ACCESS_KEY_ID"], "aws_secret_access_key": S3_CREDENTIALS["AWS_SECRET_ACCESS_KEY"],
        "region_name": S3_CREDENTIALS["AWS_DEFAULT_REGION"]})
    client.create_bucket(Bucket=name)
    return client


def s3_keys(client, bucket: str) -> list[str]:
    """Every key in the bucket."""
    keys, token = [], None
    while True:
        page = client.list_objects_v2(Bucket=bucket, **({"ContinuationToken": token} if token else {}))
        keys += [o["Key"] for o in page.get("Contents", [])]
        if not page.get("IsTruncated"):
            return keys
        token = page["NextContinuationToken"]
