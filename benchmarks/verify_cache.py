"""`verify` with the stage-prefix cache against without it: epochs trained, wall time, same numbers.

A plan's no-reference and uniform-weight twins differ from it only from the second stage on, so on
each seed their first stage is the plan's. With a stage cache (an empty folder each round here, as
on a first `verify`), the plan's runs put their stages there and the twins take the first stage
instead of training it. This script times one `verify` of a two-stage default-space plan with a
fresh cache and without one, interleaved round by round, and checks that every row's per-seed test
and validation accuracies are equal. A second `verify` of the same plan with the same cache trains
nothing; that is shown at the end.

    python benchmarks/verify_cache.py --jobs 2 --seeds 5 --rounds 2
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import torch
from _common import interleave, machine_line, median, paired_ratio, spread

from smskd_search.space import load_space, make_plan
from smskd_search.verify import run_verify


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--plan", default="dkd:6,pkt:4", help="stages as method:epochs,... (default space)")
    ap.add_argument("--teachers", default="studies/teachers")
    args = ap.parse_args()
    torch.set_num_threads(1)
    print(machine_line())
    sp = load_space("default").space
    assert sp.search is not None
    stages = [(m, int(e)) for m, e in (s.split(":") for s in args.plan.split(","))]
    plan = make_plan(sp, stages, lambda_ref=1.0)
    results: dict[str, list] = {}
    epochs: dict[str, tuple[int, int]] = {}
    work = Path(tempfile.mkdtemp(prefix="verify-cache-"))

    def runner(cached: bool):
        name = "cache" if cached else "no cache"

        def run() -> float:
            folder = work / "stages"
            if cached:
                shutil.rmtree(folder, ignore_errors=True)  # a first verify: nothing cached yet
            start = time.perf_counter()
            rows, _ = run_verify(plan, seeds=args.seeds, device="cpu", teacher_cache=args.teachers,
                                 methods=list(sp.search.methods), method_params=dict(sp.search.method_params),
                                 jobs=args.jobs, stage_cache=folder if cached else None)
            elapsed = time.perf_counter() - start
            results.setdefault(name, []).append([(r.label, r.seeds, r.test_acc, r.val_acc) for r in rows])
            epochs[name] = (sum(r.epochs_trained for r in rows), sum(r.epochs_reused for r in rows))
            return elapsed
        return run

    try:
        times = interleave({"no cache": runner(False), "cache": runner(True)}, rounds=args.rounds, warmup=0)
        n_rows = len(results["cache"][0])
        print(f"plan {plan.sequence()}: {n_rows} rows x {args.seeds} seeds = {n_rows * args.seeds} runs a verify, "
              f"jobs {args.jobs}")
        for name in ("no cache", "cache"):
            trained, reused = epochs[name]
            print(f"  {name:<9} {median(times[name]):6.1f} s  ({spread(times[name])})  epochs trained {trained}, "
                  f"reused {reused}")
        (t_on, _), (t_off, _) = epochs["cache"], epochs["no cache"]
        print(f"  epochs trained, cache / no cache: {t_on}/{t_off} = {t_on / t_off:.3f}")
        print(f"  wall, cache / no cache: {median(times['cache']) / median(times['no cache']):.2f}x (median of "
              f"per-round ratios {paired_ratio(times['cache'], times['no cache']):.2f}x)")
        start = time.perf_counter()
        rows, _ = run_verify(plan, seeds=args.seeds, device="cpu", teacher_cache=args.teachers,
                             methods=list(sp.search.methods), method_params=dict(sp.search.method_params),
                             jobs=args.jobs, stage_cache=work / "stages")
        again = [(r.label, r.seeds, r.test_acc, r.val_acc) for r in rows]
        print(f"  a second verify with that cache: {time.perf_counter() - start:.1f} s, epochs trained "
              f"{sum(r.epochs_trained for r in rows)}, reused {sum(r.epochs_reused for r in rows)}")
        same = all(r == results["no cache"][0] for rs in results.values() for r in rs) and again == results["no cache"][0]
        print(f"every row's per-seed test and val accuracies equal across all runs: {same}")
        if not same:
            raise SystemExit(1)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
