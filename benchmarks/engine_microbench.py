"""Before/after of the two small speed fixes made while benchmarking issues 2 and 3, side by side in
one run, each checked for bit-identical results first:

1. Tensor augmentation (``smskd_search.data.loader.augment_batch``): random crop (zero padding) +
   horizontal flip. Before: advanced indexing of the padded batch, a permute and a copy, then
   ``torch.where(mask, x.flip(3), x)``. After: one ``gather`` over a flat spatial index, with the flip
   folded into the column index (same random draws in the same order).
2. Cached frozen outputs (``smskd_search.engine.frozen.FrozenForward`` with a whole-split cache):
   before, every step gathered every cached feature map of the batch; after, feature maps are
   gathered when a method reads them (a logit method such as KD reads none).

    python benchmarks/engine_microbench.py [--quick]
"""

from __future__ import annotations

import argparse
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import interleave, machine_line, median, paired_ratio, spread, table  # noqa: E402

from smskd_search.data.loader import augment_batch  # noqa: E402
from smskd_search.engine.device import pick_precision  # noqa: E402
from smskd_search.engine.frozen import FrozenForward, freeze  # noqa: E402
from smskd_search.models import Features, create_model  # noqa: E402
from smskd_search.plan import AugmentSpec  # noqa: E402


def old_augment(x: torch.Tensor, padding: int, gen: torch.Generator) -> torch.Tensor:
    """The previous implementation (commit b9eb82f), kept here as the baseline."""
    b, _, h, w = x.shape
    xp = F.pad(x, (padding, padding, padding, padding))
    oy = torch.randint(0, 2 * padding + 1, (b,), generator=gen, device=gen.device)
    ox = torch.randint(0, 2 * padding + 1, (b,), generator=gen, device=gen.device)
    rows = (oy[:, None] + torch.arange(h, device=x.device))[:, :, None]
    cols = (ox[:, None] + torch.arange(w, device=x.device))[:, None, :]
    batch = torch.arange(b, device=x.device)[:, None, None]
    x = xp[batch, :, rows, cols].permute(0, 3, 1, 2).contiguous()
    mask = torch.rand(x.shape[0], generator=gen, device=gen.device) < 0.5
    return torch.where(mask[:, None, None, None], x.flip(3), x)


def old_gather(fw: FrozenForward, idx: torch.Tensor):
    logits, feats = fw.cache  # type: ignore[misc]
    pick = lambda t: t.index_select(0, idx)  # noqa: E731
    return pick(logits), Features([pick(t) for t in feats.stages], [pick(t) for t in feats.preact], pick(feats.pooled))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    dev = torch.device(args.device)
    rounds, reps = (5, 50) if args.quick else (11, 200)
    print("engine_microbench: before/after of the augmentation and cached-gather fixes")
    print(machine_line(dev))
    rows = []

    # 1. Augmentation, CIFAR batch of 64 and a digits-sized batch.
    spec = AugmentSpec(crop_padding=4, flip=True)
    for shape in [(64, 3, 32, 32), (512, 3, 32, 32)]:
        x = torch.randn(shape, device=dev)
        for seed in range(3):
            a = old_augment(x, 4, torch.Generator(dev).manual_seed(seed))
            b = augment_batch(x, spec, torch.Generator(dev).manual_seed(seed))
            assert torch.equal(a, b), "the new augmentation must equal the old one bit for bit"
        g_old, g_new = torch.Generator(dev).manual_seed(0), torch.Generator(dev).manual_seed(0)

        def timed(fn):
            def run() -> float:
                import time

                if dev.type == "cuda":
                    torch.cuda.synchronize()
                t0 = time.perf_counter()
                for _ in range(reps):
                    fn()
                if dev.type == "cuda":
                    torch.cuda.synchronize()
                return (time.perf_counter() - t0) / reps

            return run

        res = interleave({"before": timed(lambda: old_augment(x, 4, g_old)),
                          "after": timed(lambda: augment_batch(x, spec, g_new))}, rounds)
        rows.append([f"crop4+flip {tuple(shape)}", median(res["before"]) * 1e3, median(res["after"]) * 1e3,
                     spread([v * 1e3 for v in res["after"]]), f"{paired_ratio(res['before'], res['after']):.2f}x"])

    # 2. Cached teacher outputs (cnn_large on digits-sized inputs), batch of 64, a logit method
    #    (reads logits only) and a feature method (reads one stage map).
    prec = pick_precision(dev)
    torch.manual_seed(0)
    teacher = freeze(create_model("cnn_large", 10, 1, 8).to(dev))
    fw = FrozenForward(teacher, prec, torch.randn(934, 1, 8, 8, device=dev), 1024, need_features=True)
    idx = torch.randperm(934, device=dev)[:64]
    lo, fo = old_gather(fw, idx)
    ln, fn_ = fw(None, idx)  # type: ignore[arg-type]
    assert torch.equal(lo, ln) and all(torch.equal(a, b) for a, b in zip(fo.stages + fo.preact, list(fn_.stages) + list(fn_.preact)))
    assert torch.equal(fo.pooled, fn_.pooled)
    for what, read in [("logits only (kd, dkd)", lambda out: out[0]), ("+ stage 2 map (fitnet)", lambda out: out[1].stages[2])]:
        import time

        def g(fn):
            def run() -> float:
                t0 = time.perf_counter()
                for _ in range(reps):
                    read(fn())
                return (time.perf_counter() - t0) / reps

            return run

        res = interleave({"before": g(lambda: old_gather(fw, idx)), "after": g(lambda: fw(None, idx))}, rounds)  # type: ignore[arg-type]
        rows.append([f"cached cnn_large outputs, 64 rows, {what}", median(res["before"]) * 1e3,
                     median(res["after"]) * 1e3, spread([v * 1e3 for v in res["after"]]),
                     f"{paired_ratio(res['before'], res['after']):.2f}x"])

    print(f"(outputs checked bit-identical; {reps} calls per round, {rounds} rounds, threads {torch.get_num_threads()})")
    print(table(["operation", "before ms (median)", "after ms (median)", "after rounds min..max", "speed-up (paired)"], rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
