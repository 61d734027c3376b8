"""The idle time of a finished search between its budget and its confirmation runs, from its study.

For each study given: when the budget's last trial ended (Optuna's completion time of the last
budget trial), when the first confirmation run started training (``trial_started_at``, stamped by
the trainable once it runs, after its worker has started and loaded data and teacher), the gap
between the two, the spans of the two phases, and the study's whole span (first trial asked to last
trial told). Answered repeats are not budget trials here. Before the
confirmation runs shared the budget's Tune run, every search paid a fresh Tune run's start and its
workers' loading in that gap.

    python benchmarks/phase_gap.py studies/default.db [studies/other.db ...]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import optuna  # noqa: E402
from optuna.trial import TrialState  # noqa: E402

from smskd_search.search import storage as st  # noqa: E402
from smskd_search.search.confirm import is_confirmation  # noqa: E402


def gap(db: Path) -> dict[str, float | int | str]:
    storage = st.storage_url(db)
    (summary,) = optuna.get_all_study_summaries(storage)
    trials = optuna.load_study(study_name=summary.study_name, storage=storage).get_trials()
    budget = [t for t in trials if not is_confirmation(t) and t.datetime_complete is not None
              and t.user_attrs.get(st.ATTR_REPEAT_OF) is None]
    runs = [t for t in trials if is_confirmation(t) and t.user_attrs.get(st.ATTR_TRIAL_STARTED_AT) is not None]
    if not budget or not runs:
        return {"study": summary.study_name, "note": "no budget trial or no confirmation run"}
    budget_end = max(t.datetime_complete.timestamp() for t in budget)
    first_run = min(float(t.user_attrs[st.ATTR_TRIAL_STARTED_AT]) for t in runs)
    first = min(t.datetime_start.timestamp() for t in trials if t.datetime_start is not None)
    last = max(t.datetime_complete.timestamp() for t in trials if t.datetime_complete is not None)
    return {"study": summary.study_name, "budget_trials": len(budget),
            "confirmation_runs": sum(1 for t in trials if is_confirmation(t) and t.state == TrialState.COMPLETE),
            "budget_s": round(budget_end - first, 1), "gap_s": round(first_run - budget_end, 2),
            "confirm_s": round(last - first_run, 1), "span_s": round(last - first, 1)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("dbs", nargs="+", type=Path, help="study files (studies/NAME.db)")
    args = ap.parse_args(argv)
    print("| study | budget trials | confirmation runs | budget (s) | budget end -> first confirmation run (s) "
          "| confirmation (s) | span (s) |")
    print("|---|---|---|---|---|---|---|")
    for db in args.dbs:
        g = gap(db)
        if "note" in g:
            print(f"| {g['study']} | {g['note']} | | | | | |")
        else:
            print(f"| {g['study']} | {g['budget_trials']} | {g['confirmation_runs']} | {g['budget_s']} | {g['gap_s']} "
                  f"| {g['confirm_s']} | {g['span_s']} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
