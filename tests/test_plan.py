"""Plans and spaces: YAML round trip, validation errors that name the field, the CLI's exit code 2."""

from __future__ import annotations

import subprocess
import sys

import pytest
import yaml
from conftest import make_plan as plan_of

from smskd_search.errors import UserError
from smskd_search.plan import Plan, save_plan
from smskd_search.space import load_space, make_plan
from smskd_search.validate import load_plan, parse_plan


def _plan_dict(problem) -> dict:
    p = plan_of(problem, [("kd", 2), ("fitnet", 3)], reference={"lambda_ref": 0.5, "weight_mode": "direct"})
    return p.model_dump(mode="json")


def test_round_trip_is_identity(tmp_path, tiny_problem):
    plan = plan_of(tiny_problem, [("kd", 2), ("dkd", 1), ("at", 4)], seed=7, restart_optimizer=False,
                   reference={"lambda_ref": 0.3, "normalize": "batch_mean", "loss": "feature_mse"})
    plan.stages[1].params = {"beta": 2.0, "warmup_epochs": 1}
    plan.provenance = {"study": "s", "trial": 3}
    first = save_plan(plan, tmp_path / "a.yaml")
    loaded = load_plan(first)
    assert loaded == plan
    second = save_plan(loaded, tmp_path / "b.yaml")
    assert first.read_text() == second.read_text()
    assert load_plan(second) == plan
    assert loaded.sequence() == "kd(2) -> dkd(1) -> at(4)"
    assert loaded.total_epochs == 7


@pytest.mark.parametrize(
    "mutate, field",
    [
        (lambda d: d["stages"][1].update(method="nope"), "stages.1"),
        (lambda d: d["stages"][0].update(epochs=0), "stages.0.epochs"),
        (lambda d: d["reference"].update(lambda_ref=-1.0), "reference.lambda_ref"),
        (lambda d: d["reference"].update(colour="red"), "reference.colour"),
        (lambda d: d["stages"][0].update(epochs="many"), "stages.0.epochs"),
        (lambda d: d["reference"].update(weight_mode="sometimes"), "reference.weight_mode"),
        (lambda d: d["stages"][0].update(params={"T": -1}), "params of kd: T"),
        (lambda d: d["stages"][0].update(params={"temperature": 4}), "params of kd: temperature"),
        (lambda d: d["problem"]["student"].update(arch="resnet9000"), "problem.student"),
    ],
)
def test_invalid_plan_names_the_field(tiny_problem, mutate, field):
    d = _plan_dict(tiny_problem)
    mutate(d)
    with pytest.raises(UserError) as exc:
        parse_plan(d, "p.yaml")
    msg = str(exc.value)
    assert msg.startswith("p.yaml: ") and field in msg and "\n" not in msg


def test_content_hash_ignores_name_not_seed(tiny_problem):
    a = plan_of(tiny_problem, [("kd", 2)])
    assert a.content_hash() == a.model_copy(update={"name": "other"}).content_hash()
    assert a.content_hash() != a.model_copy(update={"seed": 1}).content_hash()


def test_builtin_spaces_load_and_make_valid_plans():
    for name in ("default", "fashion-mnist", "cifar10", "cifar100-resnet32x4-resnet8x4", "imagenet-resnet34-resnet18"):
        loaded = load_space(name)
        assert loaded.space.search is not None and len(loaded.sha256) == 64
        plan = make_plan(loaded.space, [(loaded.space.search.methods[0], 1)])
        assert isinstance(Plan.model_validate(plan.model_dump()), Plan)
    cifar = load_space("cifar100-resnet32x4-resnet8x4").space
    assert (cifar.recipe.lr, cifar.recipe.momentum, cifar.recipe.weight_decay, cifar.recipe.batch_size) == (0.05, 0.9, 5e-4, 64)
    assert (cifar.recipe.augment.crop_padding, cifar.recipe.augment.flip) == (4, True)
    # mdistiller's ImageNet recipe (configs/imagenet/r34_r18): torchvision's pretrained teacher, streamed data.
    imagenet = load_space("imagenet-resnet34-resnet18").space
    r = imagenet.recipe
    assert (r.lr, r.momentum, r.weight_decay, r.batch_size) == (0.2, 0.9, 1e-4, 512)
    assert (r.schedule.kind, r.schedule.milestones, r.schedule.gamma) == ("step", [0.3, 0.6, 0.9], 0.1)
    assert imagenet.problem.teacher.weights == "IMAGENET1K_V1" and imagenet.problem.dataset.stream is True
    assert imagenet.search.method_params["kd"] == {"T": 1.0, "ce_weight": 0.5, "weight": 0.5}
    assert imagenet.search.method_params["dkd"] == {"ce_weight": 1.0, "beta": 0.5, "T": 1.0, "warmup_epochs": 1}


def test_default_space_applies_method_params():
    space = load_space().space
    plan = make_plan(space, [("dkd", 3), ("kd", 2)], lambda_ref=2.0)
    assert plan.stages[0].params == space.search.method_params["dkd"]
    assert plan.reference.lambda_ref == 2.0 and plan.problem == space.problem


PROBLEM_YAML = "name: x\nproblem:\n  teacher: {arch: cnn_large}\n  student: {arch: cnn_nano}\n"


@pytest.mark.parametrize(
    "text, needle",
    [
        ("name: x\nproblem: [1, 2\n", "malformed YAML (line"),
        (PROBLEM_YAML + "search:\n  methods: [kd, bogus]\n", "search.methods.1: unknown method 'bogus'"),
        (PROBLEM_YAML + "  dataset: {val_fraction: 2}\n", "problem.dataset.val_fraction"),
        (PROBLEM_YAML + "recipe: {lr: fast}\n", "recipe.lr"),
        (PROBLEM_YAML.replace("cnn_nano", "cnn_9000"), "problem.student: unknown arch 'cnn_9000'"),
    ],
)
def test_malformed_space_names_file_and_field(tmp_path, text, needle):
    f = tmp_path / "bad.yaml"
    f.write_text(text)
    with pytest.raises(UserError) as exc:
        load_space(f)
    assert str(exc.value).startswith(str(f)) and needle in str(exc.value)


def test_cli_bad_plan_exits_2_with_one_line(tmp_path, tiny_problem):
    d = _plan_dict(tiny_problem)
    d["stages"][1]["method"] = "telepathy"
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(d))
    out = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-m", "smskd_search.cli", "train", str(bad), "--out", str(out)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "stages.1" in lines[0] and "telepathy" in lines[0]
    assert "Traceback" not in proc.stderr and not out.exists()


def test_cli_malformed_yaml_exits_2(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("stages: [kd\n")
    proc = subprocess.run([sys.executable, "-m", "smskd_search.cli", "train", str(bad)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "malformed YAML" in proc.stderr and "Traceback" not in proc.stderr


def test_cli_plan_without_version_is_refused_and_defaults_are_named(tmp_path, tiny_problem, teacher_cache):
    import os

    d = plan_of(tiny_problem, [("kd", 1)]).model_dump(mode="json")
    studies = tmp_path / "studies"
    studies.mkdir()
    (studies / "teachers").symlink_to(teacher_cache)  # the session's trained teacher
    env = {**os.environ, "SMSKD_STUDIES": str(studies)}
    unversioned = tmp_path / "unversioned.yaml"
    unversioned.write_text(yaml.safe_dump({k: v for k, v in d.items() if k != "version"}))
    proc = subprocess.run([sys.executable, "-m", "smskd_search.cli", "train", str(unversioned)],
                          capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 2 and proc.stderr.strip() == f"error: {unversioned}: version: missing; a plan file says " \
        "`version: 1` (as `export` writes it)"
    assert not (studies / "runs").exists()
    # A hand-written plan may leave recipe, reference, seed... out: train runs it and says which it defaulted.
    short = tmp_path / "short.yaml"
    short.write_text(yaml.safe_dump({"version": 1, "problem": d["problem"], "stages": d["stages"]}))
    proc = subprocess.run([sys.executable, "-m", "smskd_search.cli", "train", str(short), "--out", str(tmp_path / "r")],
                          capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr
    first, second = proc.stdout.splitlines()[:2]
    assert "kd(1)" in first and "no reference (one stage)" in first and "lambda_ref" not in first
    assert second == f"defaults used for what {short} leaves out: recipe, reference, seed, restart_optimizer " \
        "(see `Plan` in smskd_search/plan.py)"
