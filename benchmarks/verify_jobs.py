"""`verify` in worker processes against one process: wall time side by side, and the same numbers.

`verify` trains every row of its table (the plan, each single method of its space, the twins) on
every seed: 45 runs for a 3-stage plan of the default space at 5 seeds. Each run is independent,
so `run_verify(jobs=N)` hands them to N spawned worker processes. This script times one `verify` of
a default-space plan with ``jobs=1`` and with ``jobs=N``, interleaved round by round, and checks that
every row's per-seed test and validation accuracies are equal.

    python benchmarks/verify_jobs.py --jobs 2 --seeds 5 --rounds 2
"""

from __future__ import annotations

import argparse
import time

import torch
from _common import interleave, machine_line, median, paired_ratio, spread

from smskd_search.space import load_space, make_plan
from smskd_search.verify import run_verify


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--teachers", default="studies/teachers")
    args = ap.parse_args()
    torch.set_num_threads(1)
    print(machine_line())
    sp = load_space("default").space
    assert sp.search is not None
    plan = make_plan(sp, [("dkd", 6), ("pkt", 4)], lambda_ref=1.0)
    results: dict[int, list] = {}

    def runner(jobs: int):
        def run() -> float:
            start = time.perf_counter()
            rows, _ = run_verify(plan, seeds=args.seeds, device="cpu", teacher_cache=args.teachers,
                                 methods=list(sp.search.methods), method_params=dict(sp.search.method_params), jobs=jobs)
            elapsed = time.perf_counter() - start
            results.setdefault(jobs, []).append([(r.label, r.seeds, r.test_acc, r.val_acc) for r in rows])
            return elapsed
        return run

    times = interleave({"jobs=1": runner(1), f"jobs={args.jobs}": runner(args.jobs)}, rounds=args.rounds, warmup=0)
    one, many = times["jobs=1"], times[f"jobs={args.jobs}"]
    n_rows = len(results[1][0])
    print(f"plan {plan.sequence()}: {n_rows} rows x {args.seeds} seeds = {n_rows * args.seeds} runs a verify")
    print(f"  jobs=1           {median(one):6.1f} s  ({spread(one)})")
    print(f"  jobs={args.jobs:<11} {median(many):6.1f} s  ({spread(many)})")
    print(f"  jobs={args.jobs} / jobs=1: {median(many) / median(one):.2f}x (median of per-round ratios "
          f"{paired_ratio(many, one):.2f}x)")
    same = all(r == results[1][0] for rs in results.values() for r in rs)
    print(f"every row's per-seed test and val accuracies equal across all runs: {same}")
    if not same:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
