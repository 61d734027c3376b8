"""The teacher-logit store (issue 13), measured: an augmented KD stage on the CIFAR pair resnet32x4 ->
resnet8x4 with the store warm, against the same stage without it, side by side in one run.

The data are synthetic and CIFAR-10-shaped, made here (3x32x32 images, 10 classes, a class-dependent
colour and stripe pattern under noise, normalised as CIFAR-10 is): the cost of a step does not
depend on the pixels, and the run needs no files. The teacher is resnet32x4 at its seeded
initialisation (not trained: a trained teacher's forward costs the same, and what is compared is the
two runs' numbers, not their accuracy). Augmentation: random crop (padding 4) and flip, batch 64.

One run does:
  1. "cold": the plan with an empty store (every epoch runs the teacher and puts its logits);
  2. "plain" (no store) and "warm" (a fresh store object on the filled folder, so the logits come from
     disk as in another trial's process), interleaved round by round (order flipped every other
     round), wall time of each whole ``run_plan`` (validation after every epoch included);
  3. the check: warm and plain give the same per-epoch values and bit-identical student weights;
  4. what a float16 store would change: the float32 entries rounded to float16 (what
     ``LogitStore(dtype=torch.float16)`` keeps), the largest logit error, and a warm run on them
     against plain (values and weights).

    PYTHONPATH=. python benchmarks/teacher_logits.py              # 128 images, kd(3), 2 rounds
    PYTHONPATH=. python benchmarks/teacher_logits.py --train 128 --stages kd:2,dkd:1 --rounds 1
"""

from __future__ import annotations

import argparse
import hashlib
import io
import os
import shutil
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import interleave, machine_line, median, paired_ratio, spread  # noqa: E402

from smskd_search.data import DataInfo, DataSplits, TensorSplit  # noqa: E402
from smskd_search.data.__init__ import NORMALIZATION  # noqa: E402
from smskd_search.engine import LogitStore, Runtime, TeacherRecord, Workbench, run_plan, teacher_logits_key  # noqa: E402
from smskd_search.engine.device import pick_precision  # noqa: E402
from smskd_search.engine.frozen import freeze  # noqa: E402
from smskd_search.engine.stage import stage_seed  # noqa: E402
from smskd_search.models import create_model  # noqa: E402
from smskd_search.plan import (  # noqa: E402
    AugmentSpec,
    DatasetSpec,
    ProblemSpec,
    RecipeSpec,
    StudentSpec,
    TeacherSpec,
)
from smskd_search.space import Space, make_plan  # noqa: E402

MEAN, STD = NORMALIZATION["cifar10"]


def synthetic_cifar(n: int, seed: int) -> TensorSplit:
    """``n`` CIFAR-10-shaped images, normalised: per class a colour and a stripe frequency, plus noise."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % 10
    colour = torch.rand(10, 3, 1, 1, generator=g)
    ramp = torch.linspace(0, 3.1416, 32)
    stripes = torch.stack([torch.sin(ramp * (c + 1)) for c in range(10)])[:, None, None, :]  # (10,1,1,32)
    x = 0.5 * colour[labels] + 0.25 * stripes[labels] + 0.25 * torch.rand(n, 3, 32, 32, generator=g)
    x = x.clamp(0, 1)
    mean, std = torch.tensor(MEAN).view(1, 3, 1, 1), torch.tensor(STD).view(1, 3, 1, 1)
    return TensorSplit((x - mean) / std, labels)


def teacher_and_record(seed: int) -> tuple[torch.nn.Module, TeacherRecord]:
    torch.manual_seed(seed)
    model = freeze(create_model("resnet32x4", 10, 3, 32))
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    sha = hashlib.sha256(buf.getvalue()).hexdigest()
    return model, TeacherRecord("resnet32x4", "(in memory)", sha, float("nan"), 0, None, None, None,
                                "checkpoint", sha[:12])


def parse_stages(text: str) -> list[tuple[str, int]]:
    return [(m, int(e)) for m, e in (part.split(":") for part in text.split(","))]


def curve(result) -> list[tuple]:
    return [(m.cum_epochs, m.val_acc, m.val_loss, m.train_loss, m.train_kd) for s in result.stages
            for m in s.epoch_metrics]


def weights(result) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in result.student.state_dict().items()}


def max_weight_diff(a: dict, b: dict) -> float:
    return max((a[k].double() - b[k].double()).abs().max().item() for k in a)


def _float16_copy(plan, stages: list, bench: Workbench, folder: Path) -> tuple[LogitStore, float, float]:
    """The exact entries of ``folder`` rounded into a float16 store, and the largest absolute and
    relative rounding errors."""
    rt = Runtime.current(bench.device, pick_precision(bench.device, "auto"))
    half = LogitStore(None, dtype=torch.float16)
    exact_store = LogitStore(folder)
    worst_abs = worst_rel = 0.0
    for k, (_, epochs) in enumerate(stages):
        for e in range(epochs):
            kw = dict(loader_seed=stage_seed(plan.seed, k), train_shape=tuple(bench.data.train.images.shape),
                      teacher_sha256=bench.teacher_record.sha256, runtime=rt)
            entry = exact_store.get(teacher_logits_key(plan, k, e, **kw))
            assert entry is not None
            half.put(teacher_logits_key(plan, k, e, stored="float16", **kw), entry)
            rounded = half.get(teacher_logits_key(plan, k, e, stored="float16", **kw))
            assert rounded is not None
            err = (rounded.logits.double() - entry.logits.double()).abs()
            worst_abs = max(worst_abs, err.max().item())
            worst_rel = max(worst_rel, (err / entry.logits.double().abs().clamp_min(2.0**-14)).max().item())
    return half, worst_abs, worst_rel


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--train", type=int, default=128, help="training images (default 128)")
    ap.add_argument("--val", type=int, default=64, help="validation images (default 64)")
    ap.add_argument("--stages", default="kd:3", help="method:epochs,... (default kd:3)")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (default 1: the box is shared)")
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    info = DataInfo("cifar10", 10, 3, 32, MEAN, STD, args.train, args.val)
    data = DataSplits(info, synthetic_cifar(args.train, 1), synthetic_cifar(args.val, 2))
    teacher, record = teacher_and_record(0)
    problem = ProblemSpec(dataset=DatasetSpec(name="cifar10"),
                          teacher=TeacherSpec(arch="resnet32x4"), student=StudentSpec(arch="resnet8x4"))
    recipe = RecipeSpec(lr=0.05, batch_size=64, augment=AugmentSpec(crop_padding=4, flip=True))
    stages = parse_stages(args.stages)
    plan = make_plan(Space(name="bench", problem=problem, recipe=recipe), stages, seed=0)
    bench = Workbench.open(problem, device="cpu", data=data, teacher_record=record, teacher=teacher)

    folder = Path(tempfile.mkdtemp(prefix="smskd-bench-logits-"))
    try:
        print(machine_line())
        print(f"synthetic CIFAR-10-shaped data: {args.train} train / {args.val} val images; resnet32x4 -> "
              f"resnet8x4; plan {plan.sequence()}, crop 4 + flip, batch 64, seed 0; {args.rounds} round(s)")
        t0 = time.perf_counter()
        cold_store = LogitStore(folder / "teacher_logits")
        cold = run_plan(plan, replace(bench, logit_store=cold_store))
        cold_s = time.perf_counter() - t0
        disk = cold_store.disk.size_bytes() if cold_store.disk is not None else 0
        print(f"cold (empty store, every epoch puts): {cold_s:.1f}s; {cold_store.stored} epochs stored, "
              f"{disk / 2**20:.2f} MiB on disk")

        runs: dict[str, list] = {"plain": [], "warm": []}

        def timed(name: str, logit_store: LogitStore | None = None):
            def go() -> float:
                t = time.perf_counter()
                runs[name].append(run_plan(plan, replace(bench, logit_store=logit_store)))
                return time.perf_counter() - t
            return go

        # A fresh LogitStore each warm run: its memory tier is empty, the entries come from disk.
        times = interleave({"plain": timed("plain"),
                            "warm": lambda: timed("warm", logit_store=LogitStore(folder / "teacher_logits"))()},
                           rounds=args.rounds, warmup=0)
        p, w = times["plain"], times["warm"]
        served = runs["warm"][-1].teacher_epochs_served
        print(f"\n{'':<8}{'median wall':>12}{'rounds':>18}   teacher epochs served")
        print(f"{'plain':<8}{median(p):>11.1f}s{spread(p):>18}   0")
        print(f"{'warm':<8}{median(w):>11.1f}s{spread(w):>18}   {served} of {plan.total_epochs}")
        print(f"\nwall, warm / plain: ratio of medians {median(w) / median(p):.3f}, median of per-round ratios "
              f"{paired_ratio(w, p):.3f} (speed-up {median(p) / median(w):.2f}x)")
        ref = runs["plain"][0]
        same = all(curve(r) == curve(ref) for r in runs["plain"] + runs["warm"] + [cold])
        wdiff = max(max_weight_diff(weights(ref), weights(r)) for r in runs["warm"] + [cold])
        print(f"warm, cold and plain per-epoch values identical: {same}; largest student weight difference: "
              f"{wdiff:g}")

        # float16: the same entries rounded, as LogitStore(dtype=torch.float16) would keep them.
        half, worst_abs, worst_rel = _float16_copy(plan, stages, bench, folder / "teacher_logits")
        fp16 = run_plan(plan, replace(bench, logit_store=half))
        dv = [(abs(a[1] - b[1]), abs(a[2] - b[2])) for a, b in zip(curve(ref), curve(fp16))]
        print(f"\nfloat16 entries ({fp16.teacher_epochs_served} epochs served, half the bytes): largest logit error "
              f"{worst_abs:.3g} abs, {worst_rel:.3g} relative (2^-11 = {2.0**-11:.3g});")
        print(f"  against plain: per-epoch values identical: {curve(fp16) == curve(ref)}; largest |val acc| "
              f"difference {max(d[0] for d in dv):.4g}, |val loss| {max(d[1] for d in dv):.3g}; largest student "
              f"weight difference {max_weight_diff(weights(ref), weights(fp16)):.3g}")
        print(f"  final val acc / loss: plain {ref.final_val_acc:.4f} / {ref.stages[-1].val_loss:.4f}, float16 "
              f"{fp16.final_val_acc:.4f} / {fp16.stages[-1].val_loss:.4f}")
    finally:
        shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
