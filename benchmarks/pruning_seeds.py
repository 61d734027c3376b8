"""Pruning's savings and cost over sampler seeds: epochs trained and best val accuracy, paired by seed.

For each seed: one search without pruning, and one search per pruning variant, each the full
`run_search(budget)` on local Ray (same space, same sampler seed). Per variant it prints, over the
seeds, the ratio of epochs trained (pruned / unpruned; epochs = sum over trials of the last
cumulative epoch each reached) and the difference of the best val accuracies (pruned - unpruned,
points), with their means and the standard error of the mean difference.

A pair of searches compares two TPE paths (pruned trials feed the sampler, and the finishing order
of concurrent trials varies), so one pair's best-accuracy difference is one draw of a noisy
quantity. The script therefore also replays every variant's rule on the unpruned searches' own
trials (the same plans, their recorded stage values, in the order the driver received them):
"replay" is what the rule alone costs and saves, without the sampler's reaction to it. Last, it
says how well what a scheduler sees (val accuracy at a stage end, or after a number of epochs)
predicts the final val accuracy of the unpruned searches' sequences, and the fewest epochs any
stage-end rule could train without losing the winner.

    python benchmarks/pruning_seeds.py --seeds 0,1,2,3 --variant 4,2,0 --variant 2,3,1,rungs
    (a variant is grace_period,reduction_factor,noise_margin[,decide_at]; default: the space's own)
"""

from __future__ import annotations

import argparse
import math
import os
import shutil
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("RAY_AUTH_MODE", "disabled")

import optuna  # noqa: E402
import yaml  # noqa: E402
from optuna.trial import TrialState  # noqa: E402

from smskd_search.engine import ensure_teacher  # noqa: E402
from smskd_search.search import run_search  # noqa: E402
from smskd_search.search import storage as st  # noqa: E402
from smskd_search.search.pruning import StageRungs  # noqa: E402
from smskd_search.space import LoadedSpace, Space, load_space  # noqa: E402


@dataclass(frozen=True)
class Variant:
    """A pruning setting, parsed from "grace,rf,z" or "grace,rf,z,decide_at" ("2,4,2", "2,3,1,rungs")."""

    grace: int
    rf: int
    z: float
    at: str = "stage_ends"

    @classmethod
    def parse(cls, text: str) -> Variant:
        parts = text.split(",")
        at = parts[3] if len(parts) > 3 else "stage_ends"
        if len(parts) < 3 or at not in ("stage_ends", "rungs"):
            raise SystemExit(f"--variant {text}: expected grace,rf,z[,stage_ends|rungs]")
        return cls(int(parts[0]), int(parts[1]), float(parts[2]), at)

    def label(self) -> str:
        return f"g{self.grace}-rf{self.rf}-z{self.z:g}" + ("-rungs" if self.at == "rungs" else "")

    def __str__(self) -> str:
        return f"({self.grace}, {self.rf}, {self.z:g}, {self.at})"


def with_pruning(space: LoadedSpace, variant: Variant) -> LoadedSpace:
    data = space.space.model_dump(mode="json")
    data["search"]["pruning"].update(grace_period=variant.grace, reduction_factor=variant.rf,
                                     noise_margin=variant.z, decide_at=variant.at, enabled=True)
    text = yaml.safe_dump(data, sort_keys=False)
    return LoadedSpace(Space.model_validate(data), space.path, text)


def finished(studies: Path, name: str) -> list:
    study = optuna.load_study(study_name=name, storage=st.open_storage(st.db_path(studies, name)))
    return [t for t in study.get_trials(deepcopy=False) if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]


def outcome(trials: list) -> tuple[int, float]:
    epochs = sum(st.epochs_trained(t) for t in trials)
    done = [t.value for t in trials if t.state == TrialState.COMPLETE]
    return epochs, max(done) if done else float("nan")


def _reports(t, milestones: list[int], at: str) -> list[tuple[float, int, float]]:
    """(time the driver got it, cumulative epochs, val acc) of every report this rule would see."""
    cum, acc = t.user_attrs[st.ATTR_STAGE_CUM_EPOCHS], t.user_attrs[st.ATTR_STAGE_VAL_ACC]
    start = t.user_attrs[st.ATTR_TRIAL_STARTED_AT]
    when = t.user_attrs.get(st.ATTR_STAGE_REPORTED_AT)
    if when is None:  # studies made before the driver stamped reports: spread over the trial's time
        when = [start + t.user_attrs[st.ATTR_TRIAL_SECONDS] * c / cum[-1] for c in cum]
    out = list(zip(when, cum, acc))
    if at == "rungs":
        curve = t.user_attrs[st.ATTR_EPOCH_VAL_ACC]
        bounds = [(0, start), *zip(cum, when)]
        for (c0, w0), (c1, w1) in zip(bounds, bounds[1:]):
            out += [(w0 + (w1 - w0) * (m - c0) / (c1 - c0), m, curve[m - 1]) for m in milestones if c0 < m < c1]
    return sorted(out)


def replay(trials: list, search, variant: Variant) -> tuple[int, float] | None:
    """The rule run over these (unpruned) trials' reports, in the order the driver got them."""
    if variant.at == "rungs" and any(st.ATTR_EPOCH_VAL_ACC not in t.user_attrs for t in trials):
        return None  # a study made before learning curves were kept
    max_t = search.max_total_epochs
    rungs = StageRungs(min(variant.grace, max_t), variant.rf, max_t, noise_margin=variant.z)
    events = [(w, t.number, c, a) for t in trials for w, c, a in _reports(t, rungs.milestones, variant.at)]
    by_number = {t.number: t for t in trials}
    stopped: dict[int, int] = {}
    for _, number, c, a in sorted(events):
        if number in stopped:
            continue
        t = by_number[number]
        last = c == t.user_attrs[st.ATTR_STAGE_CUM_EPOCHS][-1]
        d = rungs.report(number, c, a, n=t.user_attrs.get(st.ATTR_N_VAL),
                         final=last or bool(t.user_attrs.get("baseline")))
        if d is not None and d.stop:
            stopped[number] = c
    epochs = sum(stopped.get(t.number, st.epochs_trained(t)) for t in trials)
    best = max(t.value for t in trials if t.number not in stopped and t.state == TrialState.COMPLETE)
    return epochs, best


def predictiveness(studies: list[list]) -> list[str]:
    """How well what a scheduler sees predicts how a sequence ends, on the unpruned searches' trials."""
    from scipy.stats import spearmanr

    multi = [t for trials in studies for t in trials
             if len(t.user_attrs[st.ATTR_STAGE_CUM_EPOCHS]) > 1 and not t.user_attrs.get("baseline")]
    lines = []
    for k, label in ((0, "first stage end"), (1, "second stage end (3-stage plans)")):
        pts = [(t.user_attrs[st.ATTR_STAGE_VAL_ACC][k], t.value) for t in multi
               if len(t.user_attrs[st.ATTR_STAGE_CUM_EPOCHS]) > k + 1]
        if len(pts) > 2:
            rho = spearmanr([a for a, _ in pts], [b for _, b in pts])[0]
            lines.append(f"  Spearman(val acc at the {label}, final val acc) = {rho:.2f} over {len(pts)} trials")
    curves = [t for t in multi if st.ATTR_EPOCH_VAL_ACC in t.user_attrs]
    for m in (2, 6):
        pts = [(t.user_attrs[st.ATTR_EPOCH_VAL_ACC][m - 1], t.value) for t in curves
               if t.user_attrs[st.ATTR_STAGE_CUM_EPOCHS][-1] > m]
        if len(pts) > 2:
            rho = spearmanr([a for a, _ in pts], [b for _, b in pts])[0]
            lines.append(f"  Spearman(val acc after exactly {m} epochs, final val acc) = {rho:.2f} over {len(pts)} trials")
    floors = []
    for trials in studies:
        best = max((t for t in trials if t.state == TrialState.COMPLETE), key=lambda t: t.value)
        full = sum(st.epochs_trained(t) for t in trials)
        # An oracle that stops every multi-stage sequence at its first stage end, except the winner.
        kept = sum(t.user_attrs[st.ATTR_STAGE_CUM_EPOCHS][0]
                   if len(t.user_attrs[st.ATTR_STAGE_CUM_EPOCHS]) > 1 and not t.user_attrs.get("baseline")
                   and t.number != best.number else st.epochs_trained(t) for t in trials)
        floors.append(kept / full)
    lines.append(f"  the fewest epochs any stage-end rule can train without losing the winner (an oracle "
                 f"stopping every other sequence at its first stage end): {statistics.mean(floors):.2f}x "
                 f"(range {min(floors):.2f}-{max(floors):.2f})")
    return lines


def mean_se(xs: list[float]) -> str:
    if len(xs) < 2:
        return f"{xs[0]:+.2f}" if xs else "-"
    return f"{statistics.mean(xs):+.2f} +- {statistics.stdev(xs) / math.sqrt(len(xs)):.2f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--space", default=None)
    ap.add_argument("--budget", type=int, default=50)
    ap.add_argument("--seeds", default="0,1,2,3")
    ap.add_argument("--variant", action="append", default=None,
                    help="grace_period,reduction_factor,noise_margin[,stage_ends|rungs] (repeatable; "
                         "default: the space's)")
    ap.add_argument("--replay-only", action="store_true",
                    help="run only the unpruned searches and replay the variants on them")
    ap.add_argument("--keep", default=None, help="keep the studies in this folder (reused if present)")
    args = ap.parse_args()

    space = load_space(args.space)
    search = space.space.search
    own = search.pruning
    variants = [Variant.parse(v) for v in (args.variant or [])] or \
        [Variant(own.grace_period, own.reduction_factor, own.noise_margin, own.decide_at)]
    seeds = [int(s) for s in args.seeds.split(",")]
    studies = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="smskd-prune-"))
    studies.mkdir(parents=True, exist_ok=True)
    try:
        ensure_teacher(space.space.problem, cache_root=studies / "teachers")
        print(f"space {space.path.name}, budget {args.budget}, seeds {seeds}")

        def search_once(name: str, sp: LoadedSpace, prune: bool, seed: int) -> list:
            if not st.db_path(studies, name).exists():
                t0 = time.perf_counter()
                run_search(sp, budget=args.budget, study=name, studies_dir=studies, prune=prune, seed=seed)
                print(f"  {name}: {time.perf_counter() - t0:.1f}s", flush=True)
            return finished(studies, name)

        unpruned: list[list] = []
        runs: dict[Variant, list[tuple[int, float, float, int]]] = {v: [] for v in variants}
        replays: dict[Variant, list[tuple[int, float, float]]] = {v: [] for v in variants}
        for seed in seeds:
            full = search_once(f"unpruned-s{seed}", space, False, seed)
            unpruned.append(full)
            f_epochs, f_best = outcome(full)
            for v in variants:
                r = replay(full, search, v)
                if r is not None:
                    replays[v].append((seed, r[0] / f_epochs, 100 * (r[1] - f_best)))
                if args.replay_only:
                    continue
                pruned = search_once(f"pruned-{v.label()}-s{seed}", with_pruning(space, v), True, seed)
                p_epochs, p_best = outcome(pruned)
                n_pruned = sum(1 for t in pruned if t.state == TrialState.PRUNED)
                runs[v].append((seed, p_epochs / f_epochs, 100 * (p_best - f_best), n_pruned))

        print(f"\n{'variant (grace, rf, z, decide_at)':<34}{'run: epochs':>12}{'best diff, points':>20}"
              f"{'replay: epochs':>16}{'best diff':>16}")
        for v in variants:
            run, rep = runs[v], replays[v]
            print(f"{str(v):<34}"
                  + (f"{statistics.mean(r[1] for r in run):>11.2f}x{mean_se([r[2] for r in run]):>20}" if run
                     else f"{'-':>12}{'-':>20}")
                  + (f"{statistics.mean(r[1] for r in rep):>15.2f}x{mean_se([r[2] for r in rep]):>16}" if rep
                     else f"{'-':>16}{'-':>16}"))
        print(f"(mean over {len(seeds)} seeds, +- the standard error of the mean; "
              "targets: <= 0.6x, best within 0.5 points)")
        print("\nwhat the scheduler sees against how the unpruned searches' sequences ended:")
        print("\n".join(predictiveness(unpruned)))
        print("\nper seed (epochs ratio, best diff in points):")
        for v in variants:
            by_seed = {r[0]: r for r in runs[v]}
            rep = {r[0]: r for r in replays[v]}
            for seed in seeds:
                cells = [f"  {str(v):<34} seed {seed:>2}:"]
                if seed in by_seed:
                    _, ratio, diff, n_pruned = by_seed[seed]
                    cells.append(f"run {ratio:.2f}x {diff:+6.2f} ({n_pruned:>2} pruned)")
                if seed in rep:
                    cells.append(f"replay {rep[seed][1]:.2f}x {rep[seed][2]:+6.2f}")
                print("  ".join(cells))
    finally:
        if not args.keep:
            shutil.rmtree(studies, ignore_errors=True)


if __name__ == "__main__":
    main()
