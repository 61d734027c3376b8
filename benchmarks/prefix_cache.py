"""The stage-prefix cache (issue 13), measured: the same search with and without it, side by side.

One run does, on the space given (default: the built-in default space):
  1. the teacher, trained once into a fresh folder (both searches reuse it);
  2. a `--budget N` search with the stage cache (a fresh, empty cache: it fills as the search goes),
     and the same search (same sampler seed) with `--no-cache`, in the order given by --order;
     both `--deterministic` (one trial at a time) and without confirmation runs, so that the two
     studies must hold the same trials with the same values;
  3. for each: wall time, trials by state, epochs trained and epochs reused (the trials' recorded
     user attrs), and the ratios; then whether the two studies' trials are identical (plan, state,
     value, every intermediate value).

    python benchmarks/prefix_cache.py --budget 20     # (PYTHONPATH=. from a worktree not installed)
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("RAY_AUTH_MODE", "disabled")

import optuna  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine_line  # noqa: E402

from smskd_search.engine import ensure_teacher  # noqa: E402
from smskd_search.search import run_search  # noqa: E402
from smskd_search.search import storage as st  # noqa: E402
from smskd_search.space import load_space  # noqa: E402


def measure(space, studies: Path, name: str, budget: int, seed: int, cache: bool, confirm: bool) -> dict:
    from smskd_search.search.runner import DEFAULT_CONFIRM

    t0 = time.perf_counter()
    summary = run_search(space, budget=budget, study=name, studies_dir=studies, seed=seed,
                         confirm=DEFAULT_CONFIRM if confirm else None, deterministic=True, cache=cache)
    wall = time.perf_counter() - t0
    study = optuna.load_study(study_name=name, storage=st.open_storage(st.db_path(studies, name)))
    trials = sorted(study.get_trials(deepcopy=False), key=lambda t: t.number)
    return {
        "wall": wall,
        "states": {s: sum(1 for t in trials if t.state.name == s) for s in ("COMPLETE", "PRUNED", "FAIL")},
        "trained": summary.epochs_trained,
        "reused": summary.epochs_reused,
        "sharing": sum(1 for t in trials if (t.user_attrs.get(st.ATTR_EPOCHS_REUSED) or 0) > 0),
        "trials": [(t.user_attrs.get(st.ATTR_PLAN_KEY), t.state.name, t.value, sorted(t.intermediate_values.items()))
                   for t in trials],
        "best": summary.best.val_acc if summary.best else float("nan"),
        "best_seq": summary.best.sequence if summary.best else "-",
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--space", default=None)
    ap.add_argument("--budget", type=int, default=20)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--order", choices=["cache-first", "no-cache-first"], default="cache-first")
    ap.add_argument("--keep", action="store_true", help="keep the studies folder")
    ap.add_argument("--warm", action="store_true",
                    help="then the same search again on the cache the first one filled: its wall time is the "
                         "part no cache can save (Ray, Tune's round trips, the study's writes, set-up)")
    ap.add_argument("--confirm", action="store_true",
                    help="with the search's default confirmation runs (their trials are compared too)")
    args = ap.parse_args()

    space = load_space(args.space)
    studies = Path(tempfile.mkdtemp(prefix="smskd-bench-cache-"))
    try:
        print(machine_line())
        t0 = time.perf_counter()
        record = ensure_teacher(space.space.problem, cache_root=studies / "teachers")
        print(f"space {space.path.name}; teacher {record.arch} trained in {time.perf_counter() - t0:.1f}s; "
              f"budget {args.budget}, sampler seed {args.seed}, --deterministic, "
              f"{'default confirmation' if args.confirm else 'no confirmation'}, {args.order}")
        order = [True, False] if args.order == "cache-first" else [False, True]
        r = {c: measure(space, studies, "cache" if c else "no-cache", args.budget, args.seed, c, args.confirm)
             for c in order}
        on, off = r[True], r[False]
        warm = measure(space, studies, "cache-warm", args.budget, args.seed, True, args.confirm) if args.warm else None
        print(f"\n{'':<12}{'wall':>9}{'complete':>10}{'pruned':>8}{'failed':>8}{'trained':>9}{'reused':>8}"
              f"{'trials reusing':>16}   best val acc")
        for label, m in (("cache", on), ("no cache", off), *((("cache, warm", warm),) if warm else ())):
            s = m["states"]
            print(f"{label:<12}{m['wall']:>8.1f}s{s['COMPLETE']:>10}{s['PRUNED']:>8}{s['FAIL']:>8}{m['trained']:>9}"
                  f"{m['reused']:>8}{m['sharing']:>16}   {m['best']:.4f} {m['best_seq']}")
        print(f"\nepochs trained, cache / no cache: {on['trained']}/{off['trained']} = "
              f"{on['trained'] / max(off['trained'], 1):.3f}")
        print(f"epochs reused from the stage cache: {on['reused']} "
              f"({100 * on['reused'] / max(on['reused'] + on['trained'], 1):.1f}% of the epochs the trials reached)")
        print(f"wall time, cache / no cache: {on['wall']:.1f}s / {off['wall']:.1f}s = {on['wall'] / off['wall']:.3f}")
        if warm is not None:
            print(f"wall time, warm cache / no cache: {warm['wall']:.1f}s / {off['wall']:.1f}s = "
                  f"{warm['wall'] / off['wall']:.3f} ({warm['trained']} epochs trained): the floor of the ratio")
        same = on["trials"] == off["trials"] and (warm is None or warm["trials"] == on["trials"])
        print(f"the studies' trials (plan key, state, value, intermediate values) identical: {same}")
        if not same:
            for i, (a, b) in enumerate(zip(on["trials"], off["trials"])):
                if a != b:
                    print(f"  first difference at trial {i}: {a[:3]} vs {b[:3]}")
                    break
    finally:
        if args.keep:
            print(f"studies kept in {studies}")
        else:
            shutil.rmtree(studies, ignore_errors=True)


if __name__ == "__main__":
    main()
