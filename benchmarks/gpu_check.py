"""One command that proves the GPU path end to end, on a machine with one CUDA GPU, in minutes.

Each step runs as a user would run it (the CLI in a subprocess, with its own timeout), is judged
PASS or FAIL on what it wrote, and the next runs whatever the last one did; GPU utilisation is
sampled (``nvidia-smi``, every 0.5 s) throughout and averaged per step. Steps:

1. ``environment``: the device, its name and compute capability, the precision the engine picks.
2. ``teacher``: ``smskd-search teacher`` on a CIFAR-10 image folder (a subset, a few epochs).
3. ``teacher graphs``: the same teacher trained again with ``--cuda-graphs`` into a cache of its own:
   its seconds an epoch against the eager one's, and its val accuracy within 2 points of it (on a CPU
   the option is a no-op: the same file, byte for byte).
4. ``search``: ``smskd-search --budget 8 --confirm 1 --confirm-seeds 2`` with trials packed
   several to the GPU (``gpus_per_trial`` 0.25): every budget trial finished, none failed, the
   confirmation runs completed; with the seconds from the command's start to its first trial
   training and from its last trial's end to its exit (what keeps a short search's GPU idle).
5. ``gpu busy``: the search's mean GPU utilisation (the share of time a kernel ran) from its start
   (the teacher is ready by then) to its end; the target is 90%.
6. ``export``: ``smskd-search export --top 1``.
7. ``train``: the exported winner trained on the GPU (``smskd-search train``).
8. ``graphs``: the winner trained again with ``--cuda-graphs``: on a GPU every stage recorded (no note
   that one ran eagerly) and its per-epoch numbers within bf16's reach of the ``train`` step's (train
   loss within 2%, val accuracy within 2 points), with both runs' seconds; on a CPU the option is a
   no-op that says so, and the numbers are identical.
9. ``cpu eval``: that run's last stage checkpoint loaded on the CPU and evaluated there in fp32: its
   test accuracy within 1 point of the GPU's (bf16) figure.
10. ``deterministic``: the winner trained twice with ``--deterministic``: identical numbers.
11. ``verify``: ``smskd-search verify --seeds 2``.
12. ``throughput``: ``benchmarks/gpu_throughput.py --quick --graphs --shared-teacher --mps`` (shortened:
    see ``--throughput-args``).

Logs (one per step), ``gpu_util.csv`` and ``summary.json`` / ``summary.md`` go to ``--out``.

    python benchmarks/gpu_check.py --data /tmp/cifar10              # one CUDA GPU, at most 8 minutes
    python benchmarks/gpu_check.py --device cpu --tiny              # every step on tiny sizes, CPU (tests)

``--data`` is an image folder with ``train/<class>/`` and ``test/<class>/`` (the CIFAR-10 JPEG copy
that ``../shared/gpu/on-gpu.sh`` extracts to ``/tmp/cifar10``). ``--tiny`` makes its own small image
folder, and uses small models. Exit code 0 when every step passed.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))  # phase_gap, a sibling script

STUDY = "gpu-check"
CLI = [sys.executable, "-c", "import sys; from smskd_search.cli import main; sys.exit(main())"]


@dataclass
class Step:
    name: str
    status: str = "FAIL"  # PASS, FAIL or N/A
    seconds: float = 0.0
    gpu_util_mean: float | None = None
    figures: dict = field(default_factory=dict)
    why: str = ""


class GpuSampler:
    """``nvidia-smi`` every 0.5 s in the background: (time, utilisation %, memory MiB) samples."""

    def __init__(self, out: Path):
        self.samples: list[tuple[float, float, float]] = []
        self.proc = None
        if shutil.which("nvidia-smi") is None:
            return
        self.file = open(out / "gpu_util.csv", "w")  # noqa: SIM115 - closed in stop()
        self.file.write("unix_time,utilization_gpu_pct,memory_used_mib\n")
        self.proc = subprocess.Popen(["nvidia-smi", "--query-gpu=utilization.gpu,memory.used",
                                      "--format=csv,noheader,nounits", "-lms", "500"],
                                     stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        for line in self.proc.stdout:
            parts = [p.strip() for p in line.split(",")]
            try:
                util, mem = float(parts[0]), float(parts[1])
            except (ValueError, IndexError):
                continue
            t = time.time()
            self.samples.append((t, util, mem))
            self.file.write(f"{t:.2f},{util:g},{mem:g}\n")

    def mean(self, start: float, end: float) -> float | None:
        window = [u for t, u, _ in self.samples if start <= t <= end]
        return sum(window) / len(window) if window else None

    def peak_memory(self, start: float, end: float) -> float | None:
        window = [m for t, _, m in self.samples if start <= t <= end]
        return max(window) if window else None

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(timeout=10)
            self.thread.join(timeout=5)
            self.file.close()


class Check:
    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.deadline = time.time() + args.deadline_s
        self.out = Path(args.out).resolve()
        self.out.mkdir(parents=True, exist_ok=True)
        self.env = {**os.environ, "SMSKD_STUDIES": str(self.out / "studies"), "SMSKD_CACHE": str(self.out / "cache"),
                    "PYTHONUNBUFFERED": "1", "RAY_AUTH_MODE": "disabled",
                    "PYTHONPATH": os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])}
        self.steps: list[Step] = []
        self.sampler = GpuSampler(self.out)

    def run(self, name: str, cmd: list[str], timeout: float) -> tuple[int, str, float, float]:
        """Run ``cmd`` with its log in ``<out>/<name>.log``; (exit code, output, start, end)."""
        log = self.out / f"{name.replace(' ', '_')}.log"
        start = time.time()
        timeout = max(1.0, min(timeout, self.deadline - start))  # the whole check ends by --deadline-s
        try:
            proc = subprocess.run(cmd, env=self.env, cwd=self.out, capture_output=True, text=True, timeout=timeout)
            rc, text = proc.returncode, proc.stdout + proc.stderr
        except subprocess.TimeoutExpired as exc:
            rc = 124
            text = (exc.stdout or b"").decode(errors="replace") if isinstance(exc.stdout, bytes) else (exc.stdout or "")
            text += f"\n[gpu_check: timed out after {timeout:.0f} s]"
        end = time.time()
        log.write_text(f"$ {' '.join(cmd)}\n{text}")
        return rc, text, start, end

    def step(self, name: str, fn) -> Step:
        s = Step(name)
        start = time.time()
        print(f"[{time.strftime('%H:%M:%S')}] {name} ...", flush=True)
        try:
            fn(s)
        except Exception as exc:  # noqa: BLE001 - a step's own failure is its FAIL, the next step still runs
            s.status, s.why = "FAIL", f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"
        s.seconds = round(time.time() - start, 1)
        if s.gpu_util_mean is None:
            util = self.sampler.mean(start, time.time())
            s.gpu_util_mean = None if util is None else round(util, 1)
        print(f"    {s.status} in {s.seconds:.0f} s{'  GPU ' + str(s.gpu_util_mean) + '%' if s.gpu_util_mean is not None else ''}"
              f"  {json.dumps(s.figures)}{'  ' + s.why if s.why else ''}", flush=True)
        self.steps.append(s)
        return s


# ---------------------------------------------------------------------------------------------- data

def tiny_image_folder(root: Path, classes: int = 3, train: int = 48, test: int = 12, size: int = 12) -> Path:
    """A learnable folder of PNGs: class k's images lean to one colour, with seeded noise."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for split, n in (("train", train), ("test", test)):
        for k in range(classes):
            folder = root / split / f"c{k}"
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                base = np.zeros(3)
                base[k % 3] = 160
                img = np.clip(base + rng.normal(60, 40, (size, size, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(img).save(folder / f"{i:04d}.png")
    return root


def space_yaml(args: argparse.Namespace, data: Path) -> str:
    if args.tiny:
        teacher, student, subset = "cnn_small", "cnn_tiny", "null"
        t_epochs, total, t_batch, batch, cpus, gpus = 3, 2, 32, 16, 1, 0.5
    else:
        teacher, student, subset = "resnet32x4", "resnet8x4", str(args.train_subset)
        t_epochs, total, t_batch, batch, cpus, gpus = args.teacher_epochs, args.total_epochs, 128, 64, 2, args.gpus_per_trial
    return f"""name: {STUDY}
description: gpu_check's space ({teacher} -> {student}, {total} epochs per plan)
problem:
  dataset: {{name: imagefolder, root: {data}, val_fraction: 0.1, split_seed: 0, train_subset: {subset}}}
  teacher:
    arch: {teacher}
    recipe: {{epochs: {t_epochs}, lr: 0.05, batch_size: {t_batch}, weight_decay: 5.0e-4, schedule: {{kind: cosine}},
             augment: {{crop_padding: 4, flip: true}}}}
  student: {{arch: {student}}}
recipe: {{lr: 0.05, batch_size: {batch}, weight_decay: 5.0e-4, schedule: {{kind: cosine}}, augment: {{crop_padding: 4, flip: true}}}}
search:
  methods: [kd, at]
  stages: {{min: 1, max: 2}}
  total_epochs: {total}
  lambda_ref: {{low: 0.1, high: 10.0}}
  weight_modes: [inverse, uniform]
  normalizations: [none]
  pruning: {{grace_period: 1, reduction_factor: 3, noise_margin: 1.0, decide_at: rungs}}
runtime: {{cpus_per_trial: {cpus}, gpus_per_trial: {gpus}}}
"""


def epoch_seconds(log: str) -> float | None:
    """Seconds an epoch after the first, from a ``teacher`` command's ``trained in`` line."""
    import re

    m = re.search(r"^trained in [\d.]+s, ([\d.]+)s an epoch after the first", log, re.M)
    return float(m.group(1)) if m else None


def numbers_of(results: dict) -> list[list[tuple[float, float]]]:
    """A ``train`` run's per-epoch (train loss, val acc), stage by stage, from its results.json."""
    return [[(m["train_loss"], m["val_acc"]) for m in st["epoch_metrics"]] for st in results["stages"]]


# --------------------------------------------------------------------------------------------- steps

def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda", help="cuda (default) or cpu (with --tiny: the dry run)")
    ap.add_argument("--tiny", action="store_true", help="tiny sizes and a generated image folder (a CPU dry run)")
    ap.add_argument("--data", default="/tmp/cifar10", help="image folder with train/ and test/ (default /tmp/cifar10)")
    ap.add_argument("--out", default="gpu-check", help="folder for the logs, the studies and the summary")
    ap.add_argument("--train-subset", type=int, default=10_000, help="training images used (default 10000)")
    ap.add_argument("--teacher-epochs", type=int, default=3)
    ap.add_argument("--total-epochs", type=int, default=3, help="epochs of every searched plan")
    ap.add_argument("--gpus-per-trial", type=float, default=0.25, help="the packing (default 0.25: 4 trials per GPU)")
    ap.add_argument("--budget", type=int, default=8)
    ap.add_argument("--throughput-args",
                    default="--quick --graphs --shared-teacher --mps --skip compile --n-train 10000 --pack 1,4,8 "
                            "--pack-seconds 6",
                    help="arguments for benchmarks/gpu_throughput.py on a GPU")
    ap.add_argument("--skip", default="", help="comma list of steps to leave out (e.g. throughput,verify)")
    ap.add_argument("--deadline-s", type=float, default=480.0,
                    help="seconds for the whole check (default 480): a step still running then is stopped and "
                         "FAILs, later steps are not started, the summary is written all the same")
    args = ap.parse_args(argv)
    if args.device.startswith("cuda") and args.tiny:
        print("note: --tiny on a GPU measures nothing meaningful; its steps still run")
    check = Check(args)
    skip = {s.strip() for s in args.skip.split(",") if s.strip()}
    state: dict = {}
    started = time.time()
    print(f"gpu_check: logs in {check.out}", flush=True)

    def environment(s: Step) -> None:
        import torch

        from smskd_search.engine.device import describe_device, pick_device, pick_precision

        dev = pick_device(args.device)
        prec = pick_precision(dev)
        s.figures = {**describe_device(dev), "torch": torch.__version__, "precision": prec.name,
                     "grad_scaling": prec.grad_scaling}
        s.status = "PASS" if dev.type == torch.device(args.device).type else "FAIL"

    def prepare() -> Path:
        if args.tiny:
            data = tiny_image_folder(check.out / "tiny-data")
        else:
            data = Path(args.data).resolve()
            if not (data / "train").is_dir():
                raise SystemExit(f"--data: {data}/train not found (an image folder with train/ and test/)")
        space = check.out / "space.yaml"
        space.write_text(space_yaml(args, data))
        return space

    space = prepare()
    state["space"] = space
    dev_flag = ["--device", args.device]

    def teacher(s: Step) -> None:
        rc, text, *_ = check.run("teacher", [*CLI, "teacher", "--space", str(space), *dev_flag], 900)
        teachers = list((check.out / "studies" / "teachers").glob("*/teacher.json"))
        if rc == 0 and teachers:
            rec = json.loads(teachers[0].read_text())
            s.figures = {"val_acc": round(100 * rec["val_acc"], 2), "n_val": rec["n_val"]}
            s.status = "PASS"
        else:
            s.why = f"exit {rc}: {text.strip().splitlines()[-1] if text.strip() else ''}"

    def teacher_graphs(s: Step) -> None:
        # The teacher trained again into a cache of its own, its step recorded as a CUDA graph; its
        # time an epoch (after the first: the warm-up and recordings) against the eager teacher's.
        cache = check.out / "teacher-graphs"
        shutil.rmtree(cache, ignore_errors=True)
        rc, text, *_ = check.run("teacher graphs", [*CLI, "teacher", "--space", str(space), "--cache", str(cache),
                                                    "--cuda-graphs", *dev_flag], 900)
        eager_log = (check.out / "teacher.log").read_text() if (check.out / "teacher.log").is_file() else ""
        eager, graphed = epoch_seconds(eager_log), epoch_seconds(text)
        teachers = [json.loads(p.read_text()) for p in sorted((check.out / "studies" / "teachers").glob("*/teacher.json"))]
        mine = [json.loads(p.read_text()) for p in cache.glob("*/teacher.json")]
        if rc != 0 or not teachers or not mine or eager is None or graphed is None:
            s.why = f"exit {rc}: {text.strip().splitlines()[-1] if text.strip() else ''}"
            return
        a, b = teachers[0], mine[0]
        s.figures = {"eager_s_per_epoch": eager, "graphed_s_per_epoch": graphed,
                     "speedup": round(eager / graphed, 2) if graphed > 0 else None,
                     "val_acc": [round(100 * a["val_acc"], 2), round(100 * b["val_acc"], 2)]}
        if not args.device.startswith("cuda"):
            s.status = "PASS" if a["sha256"] == b["sha256"] else "FAIL"  # a no-op on a CPU: the same file
            return
        s.status = "PASS" if abs(a["val_acc"] - b["val_acc"]) <= 0.02 else "FAIL"

    def search(s: Step) -> None:
        import optuna

        from smskd_search.search.confirm import is_confirmation
        from smskd_search.search.lifecycle import budget_done

        cmd = [*CLI, "--space", str(space), "--budget", str(args.budget), "--study", STUDY, "--confirm", "1",
               "--confirm-seeds", "2"]
        if args.tiny:
            cmd += ["--cpus-per-trial", "1"]
        rc, text, start, end = check.run("search", cmd, 1200)
        state["search_window"] = (start, end)
        trials = optuna.load_study(study_name=STUDY, storage=f"sqlite:///{check.out / 'studies' / (STUDY + '.db')}").get_trials()
        by_state: dict[str, int] = {}
        for t in trials:
            by_state[t.state.name] = by_state.get(t.state.name, 0) + 1
        confirmations = [t for t in trials if is_confirmation(t)]
        done = budget_done(trials)
        s.figures = {"trials": by_state, "budget_done": done, "confirmation_runs": len(confirmations),
                     "wall_s": round(end - start, 1), "last_lines": text.strip().splitlines()[-3:]}
        # Budget end -> first confirmation run, and the phases' spans (benchmarks/phase_gap.py).
        from phase_gap import gap

        s.figures["phases"] = gap(check.out / "studies" / f"{STUDY}.db")
        # Where the search's wall time goes besides its trials (the teacher is cached by the teacher
        # step): the command's start -> its first trial training (Python, Ray, Tune, the workers'
        # start and loading), and its last trial's end -> the command's exit.
        began = [float(t.user_attrs["trial_started_at"]) for t in trials if "trial_started_at" in t.user_attrs]
        ended = [t.datetime_complete.timestamp() for t in trials if t.datetime_complete is not None]
        if began and ended:
            s.figures["start_to_first_trial_s"] = round(min(began) - start, 1)
            s.figures["last_trial_to_exit_s"] = round(end - max(ended), 1)
        ok = rc == 0 and done >= args.budget and by_state.get("FAIL", 0) == 0 and bool(confirmations) \
            and all(t.state.name == "COMPLETE" for t in confirmations)
        s.status = "PASS" if ok else "FAIL"
        if not ok:
            s.why = f"exit {rc}, budget trials finished {done}/{args.budget}, states {by_state}, " \
                    f"confirmation runs {len(confirmations)}"

    def busy(s: Step) -> None:
        window = state.get("search_window")
        util = check.sampler.mean(*window) if window else None
        if util is None:
            s.status, s.why = "N/A", "no GPU utilisation samples (no nvidia-smi, or no search)"
            return
        s.gpu_util_mean = round(util, 1)
        s.figures = {"search_gpu_util_mean_pct": round(util, 1), "target_pct": 90,
                     "peak_memory_mib": check.sampler.peak_memory(*window)}
        s.status = "PASS" if util >= 90 else "FAIL"

    def export(s: Step) -> None:
        rc, text, *_ = check.run("export", [*CLI, "export", STUDY, "--top", "1"], 120)
        plan = check.out / "studies" / STUDY / "plans" / "rank1.yaml"
        state["plan"] = plan
        s.status = "PASS" if rc == 0 and plan.is_file() else "FAIL"
        s.why = "" if s.status == "PASS" else f"exit {rc}: {text.strip().splitlines()[-1:]}"
        if plan.is_file():
            import yaml

            s.figures = {"plan": yaml.safe_load(plan.read_text()).get("name")}

    def train(s: Step) -> None:
        run = check.out / "train-run"
        shutil.rmtree(run, ignore_errors=True)
        rc, text, start, end = check.run("train", [*CLI, "train", str(state["plan"]), "--out", str(run), *dev_flag], 900)
        state["train_seconds"] = round(end - start, 1)
        results = json.loads((run / "results.json").read_text()) if (run / "results.json").is_file() else None
        state["train_run"], state["train_results"] = run, results
        if rc == 0 and results is not None:
            s.figures = {"sequence": results["sequence"], "val_acc": round(100 * results["final_val_acc"], 2),
                         "test_acc": round(100 * results["test_acc"], 2), "n_test": results["n_test"]}
            s.status = "PASS"
        else:
            s.why = f"exit {rc}: {text.strip().splitlines()[-1] if text.strip() else ''}"

    def graphs(s: Step) -> None:
        run = check.out / "graphs-run"
        shutil.rmtree(run, ignore_errors=True)
        rc, text, start, end = check.run("graphs", [*CLI, "train", str(state["plan"]), "--out", str(run),
                                                    "--cuda-graphs", *dev_flag], 900)
        eager = state["train_results"]
        if rc != 0 or not (run / "results.json").is_file():
            s.why = f"exit {rc}: {text.strip().splitlines()[-1] if text.strip() else ''}"
            return
        got = json.loads((run / "results.json").read_text())
        a, b = numbers_of(eager), numbers_of(got)
        notes = [line for line in text.splitlines() if "cuda_graphs:" in line]
        s.figures = {"seconds": round(end - start, 1), "eager_train_seconds": state.get("train_seconds"),
                     "notes": notes, "val_acc": [round(100 * eager["final_val_acc"], 2), round(100 * got["final_val_acc"], 2)]}
        if not args.device.startswith("cuda"):
            s.status = "PASS" if a == b and any("no CUDA device" in n for n in notes) else "FAIL"
            return
        close = [len(x) == len(y) and all(abs(lx - ly) <= 0.02 * abs(lx) and abs(vx - vy) <= 0.02
                                          for (lx, vx), (ly, vy) in zip(x, y)) for x, y in zip(a, b)]
        s.figures["epochs_close"] = close
        s.status = "PASS" if not notes and len(a) == len(b) and all(close) else "FAIL"

    def cpu_eval(s: Step) -> None:
        import torch

        from smskd_search.data import load_data, load_test_split
        from smskd_search.engine import evaluate, load_checkpoint
        from smskd_search.engine.device import pick_precision
        from smskd_search.models import create_model
        from smskd_search.validate import load_plan

        plan = load_plan(str(state["plan"]))
        results = state["train_results"]
        ckpt = load_checkpoint(state["train_run"] / f"stage{len(plan.stages)}.pt")
        cpu = torch.device("cpu")
        info = load_data(plan.problem.dataset, cpu).info
        model = create_model(plan.problem.student.arch, info.num_classes, info.in_channels, info.image_size)
        model.load_state_dict(ckpt["student"])
        test = evaluate(model, load_test_split(plan.problem.dataset, info, cpu), pick_precision(cpu))
        gpu_acc = 100 * results["test_acc"]
        s.figures = {"made_on": ckpt.get("made_on"), "cpu_fp32_test_acc": round(100 * test.acc, 2),
                     "train_test_acc": round(gpu_acc, 2), "difference_points": round(100 * test.acc - gpu_acc, 2)}
        s.status = "PASS" if abs(100 * test.acc - gpu_acc) <= 1.0 else "FAIL"

    def deterministic(s: Step) -> None:
        got = []
        for i in (1, 2):
            run = check.out / f"deterministic-{i}"
            shutil.rmtree(run, ignore_errors=True)
            rc, text, *_ = check.run(f"deterministic_{i}", [*CLI, "train", str(state["plan"]), "--out", str(run),
                                                           "--deterministic", *dev_flag], 900)
            if rc != 0:
                s.why = f"run {i}: exit {rc}: {text.strip().splitlines()[-1] if text.strip() else ''}"
                return
            r = json.loads((run / "results.json").read_text())
            got.append((numbers_of(r), r["test_acc"]))
        s.figures = {"identical": got[0] == got[1], "test_acc": [round(100 * g[1], 2) for g in got]}
        s.status = "PASS" if got[0] == got[1] else "FAIL"
        # Without --deterministic: a second default run of the plan against the train step's (said, not judged).
        run = check.out / "default-2"
        shutil.rmtree(run, ignore_errors=True)
        rc, _, *_ = check.run("default_2", [*CLI, "train", str(state["plan"]), "--out", str(run), *dev_flag], 900)
        if rc == 0 and state.get("train_results"):
            a, b = state["train_results"], json.loads((run / "results.json").read_text())
            s.figures["default_runs_identical"] = numbers_of(a) == numbers_of(b) and a["test_acc"] == b["test_acc"]
            s.figures["default_runs_test_acc"] = [round(100 * a["test_acc"], 2), round(100 * b["test_acc"], 2)]

    def verify(s: Step) -> None:
        out = check.out / "verify.json"
        rc, text, *_ = check.run("verify", [*CLI, "verify", str(state["plan"]), "--seeds", "2", "--out", str(out),
                                            *dev_flag], 900)
        if rc == 0 and out.is_file():
            v = json.loads(out.read_text())
            s.figures = {"rows": [(r["label"], r["mean"]) for r in v["rows"]], "verdict": v["verdict"]}
            s.status = "PASS"
        else:
            s.why = f"exit {rc}: {text.strip().splitlines()[-1] if text.strip() else ''}"

    def throughput(s: Step) -> None:
        extra = (["--device", "cpu", "--force", "--quick", "--graphs", "--shared-teacher", "--mps", "--skip", "compile",
                  "--pack", "1,2"] if args.tiny
                 else args.throughput_args.split())
        rc, text, *_ = check.run("throughput", [sys.executable, str(ROOT / "benchmarks" / "gpu_throughput.py"), *extra], 900)
        rows = [line for line in text.splitlines()
                if line.startswith(("| ours s1 b", "| ours s2 b", "| graph s", "| plain s1"))]
        packs = [line for line in text.splitlines() if line.strip().startswith("packing N=")]
        mps = [line.strip() for line in text.splitlines() if "under MPS" in line and "packing N=" not in line]
        s.figures = {"stage_rows": rows, "packing": packs, "mps": mps}
        s.status = "PASS" if rc == 0 and rows else "FAIL"
        if s.status == "FAIL":
            s.why = f"exit {rc}"

    plan_steps = [("environment", environment), ("teacher", teacher), ("teacher graphs", teacher_graphs),
                  ("search", search), ("gpu busy", busy),
                  ("export", export), ("train", train), ("graphs", graphs), ("cpu eval", cpu_eval), ("deterministic", deterministic),
                  ("verify", verify), ("throughput", throughput)]
    needs_plan = {"train", "graphs", "cpu eval", "deterministic", "verify"}
    try:
        for name, fn in plan_steps:
            if name in skip or name.replace(" ", "_") in skip:
                check.steps.append(Step(name, "N/A", why="skipped (--skip)"))
                continue
            if name in needs_plan and not (state.get("plan") and Path(state["plan"]).is_file()):
                check.steps.append(Step(name, "FAIL", why="no exported plan"))
                continue
            if name in ("cpu eval", "graphs") and not state.get("train_results"):
                check.steps.append(Step(name, "FAIL", why="the train step wrote no results"))
                continue
            if time.time() > check.deadline - 5:
                check.steps.append(Step(name, "FAIL", why=f"not started: past --deadline-s {args.deadline_s:g}"))
                continue
            check.step(name, fn)
    finally:
        check.sampler.stop()
    total = time.time() - started
    summary = {"device": args.device, "tiny": args.tiny, "seconds": round(total, 1),
               "steps": [asdict(s) for s in check.steps]}
    (check.out / "summary.json").write_text(json.dumps(summary, indent=2))
    lines = [f"gpu_check ({'tiny, ' if args.tiny else ''}{args.device}): {total:.0f} s", "",
             "| step | status | seconds | GPU util % | figures |", "|---|---|---|---|---|"]
    for s in check.steps:
        util = "-" if s.gpu_util_mean is None else f"{s.gpu_util_mean:.1f}"
        lines.append(f"| {s.name} | {s.status} | {s.seconds:.0f} | {util} | {json.dumps(s.figures)}"
                     f"{' ' + s.why if s.why else ''} |")
    (check.out / "summary.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    failed = [s.name for s in check.steps if s.status == "FAIL"]
    print(f"\n{'PASS' if not failed else 'FAIL: ' + ', '.join(failed)}")
    return 0 if not failed else 1


if __name__ == "__main__":
    sys.exit(main())
