"""``benchmarks/gpu_check.py --device cpu --tiny``: the GPU check's every step, on a CPU, as a user runs it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_the_gpu_checks_dry_run_passes_every_step_on_a_cpu(tmp_path):
    out = tmp_path / "check"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--device", "cpu", "--tiny",
                           "--out", str(out)], capture_output=True, text=True, timeout=600,
                          env={**os.environ, "RAY_AUTH_MODE": "disabled"})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    steps = {s["name"]: s for s in summary["steps"]}
    assert list(steps) == ["environment", "teacher", "teacher graphs", "search", "gpu busy", "export", "train", "graphs", "cpu eval",
                           "deterministic", "verify", "throughput"]
    # No nvidia-smi on a CPU: utilisation is not measured, and said so rather than passed.
    assert steps.pop("gpu busy")["status"] == "N/A"
    assert {name: s["status"] for name, s in steps.items()} == {name: "PASS" for name in steps}
    assert steps["environment"]["figures"]["precision"] == "fp32"
    search = steps["search"]["figures"]
    assert search["budget_done"] == 8 and search["confirmation_runs"] >= 2 and "FAIL" not in search["trials"]
    # The confirmation ran in the budget's workers: its first run started within seconds of the
    # budget's end (a second Tune run took 3 s and more on a CPU), or before it.
    phases = search["phases"]
    assert phases["budget_trials"] == 8 and phases["confirmation_runs"] == search["confirmation_runs"]
    assert phases["gap_s"] < 2.0, phases
    # The wall time besides the trials: the start up to the first trial, the end after the last.
    assert 0 < search["start_to_first_trial_s"] < search["wall_s"] and 0 < search["last_trial_to_exit_s"] < search["wall_s"]
    # The teacher trained again with --cuda-graphs: on a CPU the same file; both timed an epoch.
    tg = steps["teacher graphs"]["figures"]
    assert tg["eager_s_per_epoch"] > 0 and tg["graphed_s_per_epoch"] > 0 and tg["val_acc"][0] == tg["val_acc"][1]
    assert steps["graphs"]["figures"]["notes"] == ["note: cuda_graphs: no CUDA device, every step runs eagerly"]
    assert any(row.startswith("| graph s1 b") for row in steps["throughput"]["figures"]["stage_rows"])
    # The packing eager, graphed, and graphed with the trials on one teacher stream (2 levels each).
    packing = steps["throughput"]["figures"]["packing"]
    assert len(packing) == 6 and sum("graphed one teacher stream" in line for line in packing) == 2, packing
    assert steps["throughput"]["figures"]["mps"] == ["... under MPS: not measured: no CUDA GPU"]
    assert steps["cpu eval"]["figures"]["difference_points"] == 0.0  # the same device and precision: the same number
    assert steps["deterministic"]["figures"]["identical"] and steps["deterministic"]["figures"]["default_runs_identical"]
    assert (out / "studies" / "gpu-check" / "plans" / "rank1.yaml").is_file()
    assert "| search | PASS |" in (out / "summary.md").read_text() and proc.stdout.strip().endswith("PASS")
