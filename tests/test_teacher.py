"""Teacher cache: miss then hit, checkpoint checks, and a real default-space training in which the
teacher beats its student trained alone."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest
import torch

from smskd_search.engine import ensure_teacher, run_plan
from smskd_search.engine.teacher import teacher_dir, teacher_key
from smskd_search.errors import UserError
from smskd_search.models import create_model
from smskd_search.space import load_space, make_plan


def test_cache_miss_then_hit(tiny_problem, tmp_path):
    calls = []
    first = ensure_teacher(tiny_problem, cache_root=tmp_path, on_epoch=lambda *a: calls.append(a))
    assert len(calls) == tiny_problem.teacher.recipe.epochs and first.source == "trained"
    weights = teacher_dir(tiny_problem, tmp_path) / "teacher.pt"
    mtime = weights.stat().st_mtime_ns
    second = ensure_teacher(tiny_problem, cache_root=tmp_path, on_epoch=lambda *a: calls.append(a))
    assert len(calls) == tiny_problem.teacher.recipe.epochs, "a cache hit must not train again"
    assert second == first and weights.stat().st_mtime_ns == mtime
    assert first.test_acc is None  # only the explicit teacher command looks at the test split
    # A different recipe is a different teacher.
    other = tiny_problem.model_copy(deep=True)
    other.teacher.recipe.epochs += 1
    assert teacher_key(other) != teacher_key(tiny_problem)


def test_user_checkpoint_is_checked_against_the_arch(tiny_problem, tmp_path):
    wrong = tmp_path / "wrong.pt"
    torch.save(create_model("cnn_tiny", 10, 1, 8).state_dict(), wrong)
    problem = tiny_problem.model_copy(deep=True)
    problem.teacher.checkpoint = str(wrong)
    with pytest.raises(UserError) as exc:
        ensure_teacher(problem, cache_root=tmp_path / "cache")
    msg = str(exc.value)
    assert msg.startswith("teacher.checkpoint:") and "does not fit arch 'cnn_small'" in msg and "shape" in msg
    assert not (tmp_path / "cache").exists()  # nothing cached from a rejected checkpoint

    right = tmp_path / "right.pt"
    torch.manual_seed(0)
    model = create_model("cnn_small", 10, 1, 8)
    torch.save({"state_dict": {f"module.{k}": v for k, v in model.state_dict().items()}}, right)
    problem.teacher.checkpoint = str(right)
    record = ensure_teacher(problem, cache_root=tmp_path / "cache")
    assert record.source == "checkpoint" and 0.0 <= record.val_acc <= 1.0

    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint")
    problem.teacher.checkpoint = str(garbage)
    with pytest.raises(UserError, match="cannot be read as a checkpoint"):
        ensure_teacher(problem, cache_root=tmp_path / "cache")


def test_default_teacher_beats_its_student_alone(tmp_path):
    """A real training on the default space: teacher (20 epochs) against the student alone."""
    space = load_space().space
    record = ensure_teacher(space.problem, cache_root=tmp_path)
    alone = run_plan(make_plan(space, [("ce", 10)]), teacher_cache=tmp_path)
    assert record.val_acc > 0.95
    assert record.val_acc - alone.final_val_acc > 0.1, (record.val_acc, alone.final_val_acc)


def test_teacher_cli_miss_then_hit(tmp_path):
    space = tmp_path / "space.yaml"
    space.write_text(
        "name: t\nproblem:\n  dataset: {name: digits, val_fraction: 0.35}\n"
        "  teacher: {arch: cnn_small, recipe: {epochs: 2}}\n  student: {arch: cnn_nano}\n"
    )
    env = {**os.environ, "SMSKD_STUDIES": str(tmp_path / "studies")}
    cmd = [sys.executable, "-m", "smskd_search.cli", "teacher", "--space", str(space)]
    first = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert first.returncode == 0, first.stderr
    assert "epoch 2/2" in first.stdout and "test acc" in first.stdout and "cache hit" not in first.stdout
    # Before the first epoch: what is trained, for how long, on what, where (digits 80% train, 35% val).
    assert first.stdout.splitlines()[0] == (
        "training the teacher cnn_small (25,154 parameters) for 2 epochs on 934 images (validation 503) on cpu; "
        "cached for later runs"), first.stdout
    # Off a terminal every epoch is a line, with the time so far and an estimate of the time left.
    assert re.search(r"epoch 1/2 .* about [\d.]+s left$", first.stdout, re.M), first.stdout
    # Then the training's time, from its start (not the data's loading), and an epoch's after the first.
    assert re.search(r"^trained in [\d.]+s, [\d.]+s an epoch after the first \(validation included\)$", first.stdout,
                     re.M), first.stdout
    second = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert second.returncode == 0 and second.stdout.startswith("cache hit: teacher cnn_small")
    assert "training the teacher" not in second.stdout and "trained in" not in second.stdout
