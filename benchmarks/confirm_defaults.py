"""How many plans, baselines and seeds should confirmation re-run? Measured, not guessed.

N searches (sampler seeds 0..N-1) each confirm generously (``--max-plans`` plans, ``--baselines``
baselines, ``--max-seeds`` fresh seeds). Smaller settings are then read off the same runs: with K
plans and S seeds, the candidates are the top K distinct plans by single-seed value plus the best
baselines, and the recommendation is the best mean over the first S confirmation seeds (the study's
own ranking rule). Every recommendation is then trained on 5 further fresh seeds and scored on the
test split, paired by seed against every single method of the space at the same total epochs.
Per setting, over searches: the mean regret (best single method's test mean minus the
recommendation's, at least 0), how often the recommendation is worse than the best single method
beyond 2 paired s.e., and what the setting costs in extra runs per search ((K + B) x S).
"none" is the single-seed winner (no confirmation).

    python benchmarks/confirm_defaults.py --searches 5 --budget 50
    python benchmarks/confirm_defaults.py --space fashion-mnist-cpu --searches 5 --budget 50

The test split is read only after every search has ended; nothing it says feeds a search.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import optuna
from _common import machine_line
from winners_hold_up import TEST_SEED_OFFSET, TestBench, _mean_se

from smskd_search.search import ConfirmSettings, run_search
from smskd_search.search import storage as st
from smskd_search.search.confirm import candidates, confirmations, seeds_for
from smskd_search.search.leaderboard import rank_by_single_seed
from smskd_search.space import load_space, make_plan


def recommend(trials, space_seed: int, plans: int, baselines: int, seeds: int):
    """The trial the study would recommend had it confirmed ``plans`` + ``baselines`` on ``seeds`` seeds."""
    ranked = rank_by_single_seed(trials)
    if plans + baselines == 0 or seeds == 0:
        return ranked[0]
    settings = ConfirmSettings(plans=plans, baselines=baselines, seeds=seeds)
    conf, use = confirmations(trials), seeds_for(space_seed, settings)

    def key(t):
        values = [conf[t.number].by_seed[s] for s in use]
        return (-statistics.fmean(values), t.total_epochs or 0, t.number)

    return min(candidates(ranked, settings), key=key)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--space", default="default")
    ap.add_argument("--searches", type=int, default=5)
    ap.add_argument("--budget", type=int, default=50)
    ap.add_argument("--max-plans", type=int, default=5)
    ap.add_argument("--baselines", type=int, default=2)
    ap.add_argument("--max-seeds", type=int, default=5)
    ap.add_argument("--test-seeds", type=int, default=5)
    ap.add_argument("--studies", default=None, help="folder for the studies (default: a temporary one)")
    ap.add_argument("--reuse", action="store_true", help="read the studies already in --studies instead of searching")
    args = ap.parse_args()
    print(machine_line())
    studies = Path(args.studies or tempfile.mkdtemp(prefix="confirm-"))
    loaded = load_space(args.space)
    sp = loaded.space
    bench = TestBench(sp, [sp.seed + TEST_SEED_OFFSET + i for i in range(args.test_seeds)], studies / "teachers")
    settings = [("none", 0, 0)] + [(f"K={k} S={s}", k, s) for k in (1, 2, 3, args.max_plans) if k <= args.max_plans
                                   for s in (1, 2, 3, args.max_seeds) if s <= args.max_seeds]
    settings = list(dict.fromkeys(settings))
    per: dict[str, list[tuple[float, bool]]] = {name: [] for name, _, _ in settings}
    for i in range(args.searches):
        name = f"conf-{i}"
        t0 = time.perf_counter()
        if not args.reuse:
            run_search(loaded, budget=args.budget, study=name, studies_dir=studies, seed=i, address="local",
                       confirm=ConfirmSettings(plans=args.max_plans, baselines=args.baselines, seeds=args.max_seeds))
        wall = time.perf_counter() - t0
        trials = optuna.load_study(study_name=name, storage=st.storage_url(st.db_path(studies, name))).get_trials()
        total = rank_by_single_seed(trials)[0].total_epochs or 0
        singles = {m: bench.test_accs(make_plan(sp, [(m, total)])) for m in sp.search.methods}
        best_m = max(singles, key=lambda m: statistics.fmean(singles[m]))
        line = []
        for label, k, s in settings:
            t = recommend(trials, sp.seed, k, args.baselines if k else 0, s)
            plan = t.plan
            accs = bench.test_accs(plan)
            dm, dse = _mean_se([a - b for a, b in zip(accs, singles[best_m])])
            regret = max(0.0, statistics.fmean(singles[best_m]) - statistics.fmean(accs))
            per[label].append((regret, dm < 0 and -dm > 2 * dse))
            line.append(f"{label}: #{t.number} {plan.sequence()} {100 * statistics.fmean(accs):.2f}%")
        print(f"search {i} ({wall:.0f} s; best single on test {best_m} {100 * statistics.fmean(singles[best_m]):.2f}%): "
              + "; ".join(line), flush=True)
    n = args.searches
    print(f"over {n} searches, {args.test_seeds} test seeds each (regret in points of test accuracy):")
    print(f"  {'setting':<10} {'extra runs':>10} {'mean regret':>12} {'max regret':>11} {'worse (2 s.e.)':>15}")
    for label, k, s in settings:
        regrets = [r for r, _ in per[label]]
        extra = (k + (args.baselines if k else 0)) * s
        print(f"  {label:<10} {extra:>10} {100 * statistics.fmean(regrets):>12.2f} {100 * max(regrets):>11.2f} "
              f"{sum(w for _, w in per[label]):>12}/{n}")
    print(f"studies: {studies}")


if __name__ == "__main__":
    main()
