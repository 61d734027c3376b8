"""Do the search's recommendations hold up on the test split? N independent searches, each checked.

For sampler seeds 0..N-1: a full search of the space (budget, baselines, pruning, confirmation, as
the command line runs it), then its recommendation and every single method of the space, at the
plan's total epochs, trained on the same fresh seeds and scored on the test split. Paired by seed.
Per search: the recommendation, its test mean, and its paired difference to the best single method
(the one with the best test mean over those seeds). Over searches: how often the recommendation is
worse than the best single method beyond 2 paired s.e. (target 0), the mean regret (best single
mean minus the recommendation's, at least 0; target <= 0.5 points), how often the single-seed
winner differed from the confirmed one, and each search's wall time (target <= 3 min).

    python benchmarks/winners_hold_up.py --searches 5 --budget 50
    python benchmarks/winners_hold_up.py --space fashion-mnist-cpu --searches 5

The test split is read only here, after each search has ended; nothing it says feeds a search.
"""

from __future__ import annotations

import argparse
import math
import statistics
import tempfile
import time
from pathlib import Path

import optuna
import torch
from _common import machine_line

from smskd_search.data import load_data
from smskd_search.engine import Workbench, ensure_teacher, evaluate_test, load_teacher, run_plan
from smskd_search.search import ConfirmSettings, run_search
from smskd_search.search import storage as st
from smskd_search.search.leaderboard import rank_by_single_seed, rank_trials
from smskd_search.space import load_space, make_plan
from smskd_search.stats import mean_se
from smskd_search.validate import load_plan

TEST_SEED_OFFSET = 2000  # fresh: searches train with the space's seed, confirmation from 1000


def _mean_se(xs: list[float]) -> tuple[float, float]:
    mean, se = mean_se(xs)
    return mean, se if se is not None else math.nan  # nan prints as such, one seed having no s.e.


class TestBench:
    """Test-split accuracies of plans over fixed fresh seeds, each (plan, seed) trained once.

    Args:
        sp: The space (its problem gives the data and the teacher).
        seeds: The fresh seeds every plan is trained on (the same for all: paired differences).
        teachers: The teacher cache folder.
    """

    def __init__(self, sp, seeds: list[int], teachers: Path):
        dev = torch.device("cpu")
        self.seeds = seeds
        self.data = load_data(sp.problem.dataset, dev)
        self.record = ensure_teacher(sp.problem, cache_root=teachers, data=self.data)
        self.teacher = load_teacher(sp.problem, self.record, self.data.info, dev)
        self.bench = Workbench.open(sp.problem, data=self.data, teacher_record=self.record, teacher=self.teacher)
        self.cache: dict[tuple[str, int], float] = {}

    def test_accs(self, plan) -> list[float]:
        out = []
        for s in self.seeds:
            p = plan.model_copy(update={"seed": s})
            key = (p.canonical_hash(), s)
            if key not in self.cache:
                torch.set_num_threads(1)  # a trial's thread count
                self.cache[key] = evaluate_test(p, run_plan(p, self.bench)).acc
            out.append(self.cache[key])
        return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--space", default="default")
    ap.add_argument("--searches", type=int, default=5)
    ap.add_argument("--budget", type=int, default=50)
    ap.add_argument("--test-seeds", type=int, default=5)
    ap.add_argument("--studies", default=None, help="folder for the studies (default: a temporary one)")
    ap.add_argument("--reuse", action="store_true",
                    help="check the studies already in --studies instead of searching again (no wall times then)")
    args = ap.parse_args()
    print(machine_line())
    studies = Path(args.studies or tempfile.mkdtemp(prefix="winners-"))
    loaded = load_space(args.space)
    sp = loaded.space
    seeds = [sp.seed + TEST_SEED_OFFSET + i for i in range(args.test_seeds)]

    bench = TestBench(sp, seeds, studies / "teachers")
    test_accs = bench.test_accs

    rows = []
    for i in range(args.searches):
        t0 = time.perf_counter()
        if args.reuse:
            wall = math.nan
        else:
            run_search(loaded, budget=args.budget, study=f"hold-{i}", studies_dir=studies, seed=i, address="local",
                       confirm=ConfirmSettings())
            wall = time.perf_counter() - t0
        trials = optuna.load_study(study_name=f"hold-{i}", storage=st.storage_url(st.db_path(studies, f"hold-{i}"))
                                   ).get_trials()
        first = rank_by_single_seed(trials)[0]
        single_seed_winner = first.number
        confirmed_winner = rank_trials(trials)[0].number
        rec = load_plan(studies / f"hold-{i}" / "best.yaml")
        unconfirmed = first.plan
        total = rec.total_epochs
        rec_acc = test_accs(rec)
        singles = {m: test_accs(make_plan(sp, [(m, total)])) for m in sp.search.methods}
        best_m = max(singles, key=lambda m: statistics.fmean(singles[m]))
        d = [a - b for a, b in zip(rec_acc, singles[best_m])]
        dm, dse = _mean_se(d)
        worse = dm < 0 and -dm > 2 * dse
        regret = max(0.0, statistics.fmean(singles[best_m]) - statistics.fmean(rec_acc))
        # What the single-seed ranking (no confirmation) would have recommended, on the same seeds.
        u_acc = test_accs(unconfirmed)
        ud = [a - b for a, b in zip(u_acc, singles[best_m])]
        udm, udse = _mean_se(ud)
        u_worse = udm < 0 and -udm > 2 * udse
        u_regret = max(0.0, statistics.fmean(singles[best_m]) - statistics.fmean(u_acc))
        rows.append((wall, worse, regret, single_seed_winner != confirmed_winner, u_worse, u_regret))
        print(f"search {i}: {wall:5.0f} s  recommended #{confirmed_winner} {rec.sequence()} ({total} epochs): test "
              f"{100 * statistics.fmean(rec_acc):.2f}%; best single {best_m} {100 * statistics.fmean(singles[best_m]):.2f}%; "
              f"paired difference {100 * dm:+.2f} +- {100 * dse:.2f} over {len(seeds)} seeds"
              f"{'  WORSE beyond 2 s.e.' if worse else ''}; single-seed winner #{single_seed_winner} "
              f"{unconfirmed.sequence()}: test {100 * statistics.fmean(u_acc):.2f}%, paired {100 * udm:+.2f} +- "
              f"{100 * udse:.2f}{'  WORSE beyond 2 s.e.' if u_worse else ''}", flush=True)
    n = len(rows)
    walls = [r[0] for r in rows if not math.isnan(r[0])]
    print(f"over {n} searches: worse than the best single method beyond 2 paired s.e. {sum(r[1] for r in rows)}/{n}; "
          f"mean regret {100 * statistics.fmean(r[2] for r in rows):.2f} points; single-seed winner != confirmed "
          f"{sum(r[3] for r in rows)}/{n}"
          + (f"; wall per search {min(walls):.0f}-{max(walls):.0f} s" if walls else ""))
    print(f"  the single-seed winners instead (no confirmation): worse beyond 2 paired s.e. {sum(r[4] for r in rows)}/{n}; "
          f"mean regret {100 * statistics.fmean(r[5] for r in rows):.2f} points")
    print(f"studies: {studies}")


if __name__ == "__main__":
    main()
