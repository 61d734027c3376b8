"""The default search, measured: `--budget N` wall time, pruning's savings, Ray's overhead share.

One run does, on the space given (default: the built-in default space):
  1. the teacher, trained once into a fresh cache (timed apart: every later search reuses it);
  2. a search with pruning, and the same search (same seed) without pruning;
  3. for each: wall time, trials by state, epochs actually trained (sum over trials of the last
     cumulative epoch each reached), best val accuracy with its n;
  4. the ratio of epochs trained (pruned / unpruned) and the difference of the best val accuracies;
  5. where the pruned search's wall time goes, from the times each trial recorded (its function's
     start, and its seconds up to its last report):
     - start: from the call to the first trial's function (ray.init, Tune, a worker process per
       slot, which imports torch and the trainable);
     - per trial: when a trial ends, the time until the next one starts on the freed slot (Tune's
       bookkeeping, the searcher's tell and ask, resetting the reused actor); summed over trials and
       divided by (slots x wall) it is Ray's per-trial overhead share;
     - end: from the last trial's end to the return (Tune's wind-down, ray.shutdown, the summary);
     - all together: 1 - (time inside trials) / (slots x wall).
     Time a trial spends blocked in a stage report (the driver's round trip) counts as inside.

    python benchmarks/search_budget.py                  # budget 50, default space
    python benchmarks/search_budget.py --budget 12      # quicker

Pruning's effect over several sampler seeds, and pruning variants: benchmarks/pruning_seeds.py.
"""

from __future__ import annotations

import argparse
import datetime
import os
import shutil
import tempfile
import time
from pathlib import Path

os.environ.setdefault("RAY_AUTH_MODE", "disabled")

import optuna  # noqa: E402
from optuna.trial import TrialState  # noqa: E402

from smskd_search.engine import ensure_teacher  # noqa: E402
from smskd_search.search import run_search  # noqa: E402
from smskd_search.search import storage as st  # noqa: E402
from smskd_search.space import load_space  # noqa: E402


def measure(space, studies: Path, name: str, budget: int, prune: bool, seed: int) -> dict:
    t0, t0_clock = time.perf_counter(), datetime.datetime.now()
    summary = run_search(space, budget=budget, study=name, studies_dir=studies, prune=prune, seed=seed)
    wall = time.perf_counter() - t0
    study = optuna.load_study(study_name=name, storage=st.open_storage(st.db_path(studies, name)))
    trials = study.get_trials(deepcopy=False)
    epochs = sum(st.epochs_trained(t) for t in trials)
    busy = sum(t.user_attrs.get(st.ATTR_TRIAL_SECONDS, 0.0) for t in trials)
    # Each trial's [start, end) inside its function, wall clock.
    spans = sorted((t.user_attrs[st.ATTR_TRIAL_STARTED_AT],
                    t.user_attrs[st.ATTR_TRIAL_STARTED_AT] + t.user_attrs.get(st.ATTR_TRIAL_SECONDS, 0.0))
                   for t in trials if st.ATTR_TRIAL_STARTED_AT in t.user_attrs)
    slots = summary.max_concurrent
    starts, ends = [a for a, _ in spans], sorted(b for _, b in spans)
    # The j-th trial to end frees the slot that the (slots + j)-th trial to start takes.
    handover = [starts[slots + j] - ends[j] for j in range(len(spans) - slots)]
    done = [t for t in trials if t.state == TrialState.COMPLETE]
    best = max(done, key=lambda t: t.value) if done else None
    first = min(t.datetime_start for t in trials if t.datetime_start)
    return {
        "startup": (first - t0_clock).total_seconds(),
        "to_first_start": starts[0] - t0_clock.timestamp() if starts else float("nan"),
        "after_last_end": t0_clock.timestamp() + wall - ends[-1] if ends else float("nan"),
        "handover": handover,
        "wall": wall,
        "states": {s.name: sum(1 for t in trials if t.state == s) for s in (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)},
        "epochs": epochs,
        "busy": busy,
        "slots": slots,
        "best": best.value if best else float("nan"),
        "best_seq": best.user_attrs.get(st.ATTR_SEQUENCE) if best else "-",
        "n_val": best.user_attrs.get(st.ATTR_N_VAL) if best else None,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--space", default=None)
    ap.add_argument("--budget", type=int, default=50)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--keep", action="store_true", help="keep the studies folder")
    args = ap.parse_args()

    space = load_space(args.space)
    studies = Path(tempfile.mkdtemp(prefix="smskd-bench-"))
    try:
        t0 = time.perf_counter()
        record = ensure_teacher(space.space.problem, cache_root=studies / "teachers")
        teacher_s = time.perf_counter() - t0
        print(f"space {space.path.name}; teacher {record.arch} trained in {teacher_s:.1f}s (val acc {record.val_acc:.4f})")
        pruned = measure(space, studies, "with-pruning", args.budget, True, args.seed)
        full = measure(space, studies, "no-pruning", args.budget, False, args.seed)
        print(f"\n{'':<14}{'wall':>9}{'complete':>10}{'pruned':>8}{'failed':>8}{'epochs':>8}   best val acc")
        for label, r in (("pruning", pruned), ("no pruning", full)):
            s = r["states"]
            print(f"{label:<14}{r['wall']:>8.1f}s{s['COMPLETE']:>10}{s['PRUNED']:>8}{s['FAIL']:>8}{r['epochs']:>8}   "
                  f"{r['best']:.4f} (n={r['n_val']}) {r['best_seq']}")
        print(f"\nepochs trained, pruning / no pruning: {pruned['epochs'] / max(full['epochs'], 1):.2f}x (target <= 0.6)")
        print(f"best val acc, pruning - no pruning: {100 * (pruned['best'] - full['best']):+.2f} points (target within 0.5)")
        p = pruned
        slot_s = p["slots"] * p["wall"]
        h = p["handover"]
        print(f"\nwhere the pruned search's {p['wall']:.1f}s went ({p['slots']} slots, {slot_s:.1f} slot-seconds):")
        print(f"  inside trials                {p['busy']:7.1f} slot-s")
        print(f"  start (ray.init, Tune, worker boot), to the first trial  {p['to_first_start']:.1f}s "
              f"(first ask after {p['startup']:.1f}s)")
        if h:
            print(f"  per trial: slot freed -> next trial started  {sum(h):.1f} slot-s over {len(h)} handovers, "
                  f"median {1000 * sorted(h)[len(h) // 2]:.0f} ms, max {1000 * max(h):.0f} ms: "
                  f"Ray's per-trial overhead share {100 * sum(h) / slot_s:.1f}% of the wall (target <= 10%)")
        print(f"  end (wind-down, ray.shutdown, summary)  {p['after_last_end']:.1f}s")
        share = 1.0 - p["busy"] / slot_s
        print(f"  all outside trials (start, handovers, idle slots at the tail, end): {100 * share:.1f}% of the slots")
        print(f"a first `smskd-search --budget {args.budget}` on this machine: about {teacher_s + pruned['wall']:.0f}s "
              f"(teacher {teacher_s:.0f}s + search {pruned['wall']:.0f}s)")
    finally:
        if args.keep:
            print(f"studies kept in {studies}")
        else:
            shutil.rmtree(studies, ignore_errors=True)


if __name__ == "__main__":
    main()
