"""A teacher from torchvision's weights by name (``teacher: {arch: resnet18, weights: IMAGENET1K_V1}``):
found in torch hub's cache, loaded, measured on the validation split and shipped to trials as bytes;
its wrong uses are one error line each, before anything is written."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image

from smskd_search.data import load_data
from smskd_search.engine import ensure_teacher, load_teacher
from smskd_search.engine.device import pick_precision
from smskd_search.engine.evaluate import evaluate
from smskd_search.engine.teacher import TeacherRecord, published_note, teacher_key
from smskd_search.errors import UserError
from smskd_search.models import create_model
from smskd_search.plan import DatasetSpec, ProblemSpec, StudentSpec, TeacherSpec
from smskd_search.search.teacher_transport import pack, unpack
from smskd_search.validate import check_problem

HUB_NAME = "resnet18-f37072fd.pth"  # torchvision's file of resnet18 IMAGENET1K_V1 (and DEFAULT)
CLASSES = ("ant", "bee", "cow", "doe")


@pytest.fixture
def env(tmp_path, monkeypatch) -> dict[str, Path]:
    """torch hub's cache, the decoded-data cache and a 4-class 32x32 RGB imagefolder, all under tmp."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setenv("SMSKD_CACHE", str(tmp_path / "datacache"))
    rng = np.random.default_rng(0)
    for split, n in (("train", 10), ("test", 3)):
        for label, c in enumerate(CLASSES):
            (tmp_path / "img" / split / c).mkdir(parents=True)
            for i in range(n):
                pixels = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
                pixels[..., label % 3] //= 4  # a class's colour cast: something a network could learn
                Image.fromarray(pixels).save(tmp_path / "img" / split / c / f"{i}.png")
    hub = tmp_path / "torch" / "hub" / "checkpoints"
    hub.mkdir(parents=True)
    return {"hub": hub, "img": tmp_path / "img", "root": tmp_path}


def save_hub_file(hub: Path, num_classes: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """A random-init torchvision resnet18 saved under torchvision's own file name."""
    torch.manual_seed(seed)
    state = torchvision.models.resnet18(weights=None, num_classes=num_classes).state_dict()
    torch.save(state, hub / HUB_NAME)
    return state


def problem_of(img: Path, **teacher) -> ProblemSpec:
    return ProblemSpec(dataset=DatasetSpec(name="imagefolder", root=str(img), val_fraction=0.25),
                       teacher=TeacherSpec(arch="resnet18", **teacher), student=StudentSpec(arch="cnn_nano"))


def test_weights_teacher_is_loaded_measured_and_shipped_as_bytes(env):
    state = save_hub_file(env["hub"], len(CLASSES))
    problem = problem_of(env["img"], weights="IMAGENET1K_V1")
    check_problem(problem, "space.yaml")
    record = ensure_teacher(problem, cache_root=env["root"] / "teachers")
    assert record.source == "pretrained" and record.epochs is None
    assert Path(record.path) == (env["hub"] / HUB_NAME).resolve()

    # Its val accuracy is that of the state dict evaluated here, by hand.
    data = load_data(problem.dataset)
    model = create_model("resnet18", len(CLASSES), 3, 32)
    model.load_state_dict(state)
    expected = evaluate(model.eval(), data.val, pick_precision(torch.device("cpu")), problem.teacher.recipe.eval_batch_size)
    assert (record.val_acc, record.n_val) == (expected.acc, expected.n) and record.n_val == 10
    assert published_note(problem, record) is None  # 4 classes: not ImageNet-like, no published top-1

    # A search's trial gets the file's bytes (never the driver's path) and loads the same teacher.
    got, weights = unpack(pack(record))
    teacher = load_teacher(problem, got, data.info, "cpu", weights=weights)
    assert all(torch.equal(teacher.state_dict()[k], v) for k, v in state.items())

    # A cache hit the second time; a different file under the same name is a different teacher.
    assert ensure_teacher(problem, cache_root=env["root"] / "teachers") == record
    save_hub_file(env["hub"], len(CLASSES), seed=1)
    assert teacher_key(problem) != record.key


def test_on_a_cluster_the_driver_loads_and_measures_the_weights_itself(env):
    """Not a Ray task: torchvision's weights are in the driver's hub cache and need no training."""
    from smskd_search.search.teacher_task import ensure_teacher_on_cluster

    save_hub_file(env["hub"], len(CLASSES))
    problem = problem_of(env["img"], weights="DEFAULT")
    record, node = ensure_teacher_on_cluster(problem, env["root"] / "teachers")
    assert node is None and record.source == "pretrained" and record.n_val == 10
    assert ensure_teacher_on_cluster(problem, env["root"] / "teachers") == (record, None)  # a cache hit


def test_num_classes_mismatch_is_one_line_saying_what_to_do(env):
    save_hub_file(env["hub"], 1000)
    problem = problem_of(env["img"], weights="IMAGENET1K_V1")
    with pytest.raises(UserError) as exc:
        ensure_teacher(problem, cache_root=env["root"] / "teachers")
    msg = str(exc.value)
    assert msg.startswith("teacher.weights: ") and "\n" not in msg
    assert "it classifies 1000 classes, the dataset has 4; use a dataset with the same classes" in msg
    assert "replacing the classifier head is not supported" in msg
    assert not (env["root"] / "teachers").exists()


def test_published_top1_is_said_for_imagenet_shaped_weights(env):
    save_hub_file(env["hub"], 1000)
    problem = problem_of(env["img"], weights="IMAGENET1K_V1")
    record = TeacherRecord("resnet18", str(env["hub"] / HUB_NAME), "0" * 64, 0.5, 200, None, None, None, "pretrained", "k")
    assert published_note(problem, record) == (
        "torchvision publishes 69.76% top-1 for resnet18 IMAGENET1K_V1: on the full ImageNet-1K validation set "
        "(50,000 images), not on this split (n=200)")


def _space(path: Path, img: Path, teacher: str) -> Path:
    path.write_text(f"name: t\nproblem:\n  dataset: {{name: imagefolder, root: {img}, val_fraction: 0.25}}\n"
                    f"  teacher: {teacher}\n  student: {{arch: cnn_nano}}\n")
    return path


def _teacher_cli(space: Path, root: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "SMSKD_STUDIES": str(root / "studies"), "PYTHONPATH": str(Path(__file__).parents[1])}
    return subprocess.run([sys.executable, "-m", "smskd_search.cli", "teacher", "--space", str(space)],
                          capture_output=True, text=True, timeout=300, env=env)


def test_teacher_command_prints_the_val_top1(env):
    save_hub_file(env["hub"], len(CLASSES))
    space = _space(env["root"] / "space.yaml", env["img"], "{arch: resnet18, weights: IMAGENET1K_V1}")
    out = _teacher_cli(space, env["root"])
    assert out.returncode == 0, out.stderr
    assert re.search(rf"^teacher resnet18: val acc \d+\.\d\d% \(n=10\), test acc \d+\.\d\d% \(n=12\) "
                     rf"\[{re.escape(str(env['hub'] / HUB_NAME))}\]$", out.stdout, re.M), out.stdout
    assert "training the teacher" not in out.stdout and "torchvision publishes" not in out.stdout
    again = _teacher_cli(space, env["root"])
    assert again.returncode == 0 and again.stdout.startswith("cache hit: teacher resnet18: val acc"), again.stdout


@pytest.mark.parametrize(("teacher", "error"), [
    ("{arch: resnet18, weights: IMAGENET1K_V1, checkpoint: /nowhere/t.pt}",
     "problem.teacher.weights: give either checkpoint (/nowhere/t.pt) or weights (IMAGENET1K_V1), not both"),
    ("{arch: resnet18, weights: IMAGENET9K}",
     "problem.teacher.weights: resnet18 has no weights 'IMAGENET9K'; torchvision has IMAGENET1K_V1, DEFAULT"),
    ("{arch: vgg13, weights: IMAGENET1K_V1}",
     "problem.teacher.weights: torchvision publishes no weights for arch 'vgg13' (the zoo's archs that are "
     "torchvision's: mobilenet_v2, resnet18, resnet34, resnet50); leave weights out to train it"),
])
def test_wrong_weights_are_one_error_line_and_nothing_written(env, teacher, error):
    space = _space(env["root"] / "space.yaml", env["img"], teacher)
    out = _teacher_cli(space, env["root"])
    assert out.returncode == 2 and out.stdout == ""
    assert out.stderr == f"error: {space}: {error}\n", out.stderr
    assert not (env["root"] / "studies").exists() and not any(env["hub"].iterdir())


def test_weights_change_the_plan_hash_only_when_set(tiny_problem):
    from conftest import make_plan

    plan = make_plan(tiny_problem, [("kd", 1)])
    assert "weights" not in plan._hashed()["problem"]["teacher"]  # hashes of plans made before it hold
    other = plan.model_copy(deep=True)
    other.problem.teacher.weights = "IMAGENET1K_V1"
    assert other.content_hash() != plan.content_hash()


@pytest.mark.slow
def test_a_search_prints_the_teacher_before_its_trials_which_get_it_as_bytes(env):
    """A real search of one trial (Ray, the CLI): the teacher's line comes before the leaderboard,
    and the trial, which gets the teacher's file as bytes through the object store, completes."""
    save_hub_file(env["hub"], len(CLASSES))
    space = env["root"] / "space.yaml"
    space.write_text(
        f"name: t\nproblem:\n  dataset: {{name: imagefolder, root: {env['img']}, val_fraction: 0.25}}\n"
        "  teacher: {arch: resnet18, weights: IMAGENET1K_V1}\n  student: {arch: cnn_nano}\n"
        "search: {methods: [kd], stages: {min: 1, max: 1}, epochs: {min: 1, max: 1}, pruning: {enabled: false}}\n")
    env_vars = {**os.environ, "SMSKD_STUDIES": str(env["root"] / "studies"), "PYTHONPATH": str(Path(__file__).parents[1])}
    out = subprocess.run([sys.executable, "-m", "smskd_search.cli", "--space", str(space), "--budget", "1", "--study", "pt",
                          "--no-confirm", "--no-baselines", "--cpus-per-trial", "1"],
                         capture_output=True, text=True, timeout=600, env=env_vars)
    assert out.returncode == 0, out.stdout + out.stderr
    first = out.stdout.splitlines()[0]  # before any progress line
    assert re.fullmatch(rf"teacher resnet18: val acc \d+\.\d\d% \(n=10\) \[{re.escape(str(env['hub'] / HUB_NAME))}\]",
                        first), out.stdout
    assert "1/1 trials: 1 complete, 0 pruned, 0 failed" in out.stdout, out.stdout


def test_a_class_subset_reads_the_teachers_logits_at_its_classes(env):
    """ImageNet-100 style: a folder of all the classes, ``dataset.classes`` keeping some, and a teacher
    that classifies all of them: its classifier keeps the rows of the kept classes, so its logits are
    the full ones read at those classes (and its accuracy is measured among them)."""
    state = save_hub_file(env["hub"], len(CLASSES))
    problem = problem_of(env["img"], weights="IMAGENET1K_V1")
    problem = problem.model_copy(update={"dataset": problem.dataset.model_copy(update={"classes": ["bee", "doe"]})})
    record = ensure_teacher(problem, cache_root=env["root"] / "teachers")
    data = load_data(problem.dataset)
    assert data.info.num_classes == 2
    teacher = load_teacher(problem, record, data.info, "cpu")
    full = create_model("resnet18", len(CLASSES), 3, 32)
    full.load_state_dict(state)
    full.eval()
    x = data.val.images[:6]
    with torch.no_grad():
        # Equal up to rounding: a classifier of 2 rows and one of 4 may take different GEMM kernels
        # (bit-equal on one CPU, a last bit apart on another); a wrong row is 0.1 away.
        torch.testing.assert_close(teacher(x)[0], full(x)[0][:, [1, 3]], rtol=0, atol=1e-6)  # bee, doe: 1 and 3 of 4
    expected = evaluate(teacher, data.val, pick_precision(torch.device("cpu")), problem.teacher.recipe.eval_batch_size)
    assert (record.val_acc, record.n_val) == (expected.acc, expected.n) and record.n_val == 5
    assert record.key != teacher_key(problem_of(env["img"], weights="IMAGENET1K_V1"))  # another teacher
