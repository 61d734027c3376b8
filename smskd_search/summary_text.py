"""The text of a search: its leaderboard and its progress line (the CLI prints them).

Accuracies are printed as fractions with their sample size and binomial standard error.
"""

from __future__ import annotations

from smskd_search.search import LeaderboardRow, ProgressInfo, SearchSummary
from smskd_search.stats import binomial_se, difference_se


def fmt_duration(seconds: float) -> str:
    s = int(round(seconds))
    return f"{s // 60}m {s % 60:02d}s" if s >= 60 else f"{seconds:.1f}s"


def progress_line(p: ProgressInfo) -> str:
    """One line of a running search's progress."""
    if p.phase == "confirm":
        return (f"[{p.elapsed_s:5.0f}s] confirming on fresh seeds: {p.done}/{p.budget} runs  running {p.running}  "
                f"failed {p.failed}")
    best = f"best {100 * p.best_value:.2f}%" if p.best_value is not None else "best -"
    repeats = f"  repeats {p.repeats}" if p.repeats else ""
    confirming = (f"  confirming {p.confirm_running} ({p.confirm_done} done)"
                  if p.confirm_running or p.confirm_done else "")
    return (f"[{p.elapsed_s:5.0f}s] done {p.done}/{p.budget}  running {p.running}  "
            f"pruned {p.pruned}  failed {p.failed}{repeats}  {best}{confirming}")


def _pct(p: float) -> str:
    return f"{100 * p:.2f}%"


def _pts(p: float) -> str:
    return f"{100 * p:.2f}"


def _diff(d: tuple[float, float | None, int]) -> str:
    mean, se, n = d
    return f"{100 * mean:+.2f}" + (f" ± {100 * se:.2f}" if se is not None else "") + f" ({n})"


def epochs_line(trained: int, reused: int, cache: bool = True) -> str:
    """``312 trained, 110 reused from the stage cache`` (what the stage-prefix cache saved)."""
    if not cache:
        return f"{trained} trained (stage cache off)"
    return f"{trained} trained, {reused} reused from the stage cache"


def _acc_cell(r: LeaderboardRow) -> str:
    se = binomial_se(r.val_acc, r.n_val)
    return _pct(r.val_acc) + (f" ± {_pts(se)}" if se is not None else "") + (f" (n={r.n_val})" if r.n_val else "")


def _confirmed_cell(r: LeaderboardRow) -> str:
    c = r.confirmed
    if c is None:
        return "-"
    return _pct(c.mean) + (f" ± {_pts(c.se)}" if c.se is not None else "") + f" ({c.n} seeds)"


def _table_lines(rows: list[LeaderboardRow], confirmed: bool) -> list[str]:
    """The top plans as aligned columns, their stages last."""
    columns: list[tuple[str, list[str], str]] = [
        ("rank", [f"{r.rank}{'*' if r.pareto else ''}" for r in rows], ">"),
        ("trial", [f"#{r.number}" for r in rows], "<"),
        ("val acc, 1 seed", [_acc_cell(r) for r in rows], "<"),
    ]
    if confirmed:
        columns += [("confirmed, fresh seeds", [_confirmed_cell(r) for r in rows], "<"),
                    ("vs best baseline (seeds)", [_diff(r.vs_baseline) if r.vs_baseline else "-" for r in rows], "<")]
    columns += [
        ("epochs", ["-" if r.total_epochs is None else str(r.total_epochs) for r in rows], ">"),
        ("lambda_ref", ["-" if r.lambda_ref is None else f"{r.lambda_ref:.3g}" for r in rows], "<"),
        ("reference", [(r.weight_mode or "-") + (" batch-mean" if r.normalize == "batch_mean" else "")
                       for r in rows], "<"),
    ]
    widths = [max(len(title), *(len(c) for c in cells)) for title, cells, _ in columns]
    lines = ["  ".join(f"{title:{align}{w}}" for (title, _, align), w in zip(columns, widths)) + "  stages"]
    for i, r in enumerate(rows):
        cells = "  ".join(f"{col[1][i]:{col[2]}{w}}" for col, w in zip(columns, widths))
        lines.append(f"{cells}  {r.sequence}" + (f"   [baseline {r.baseline}]" if r.baseline else ""))
    return lines


def _confirmed_verdict(best: LeaderboardRow) -> list[str]:
    """The recommendation by its mean over the fresh seeds, against the best confirmed baseline."""
    c = best.confirmed
    assert c is not None
    head = (f"recommended: #{best.number} {best.sequence}: {_pct(c.mean)}"
            + (f" ± {_pts(c.se)}" if c.se is not None else "") + f" over {c.n} fresh seeds")
    if best.baseline:
        line = head + f"; it is the baseline {best.baseline}: no searched plan beat it on the fresh seeds"
    elif best.vs_baseline is not None:
        mean, se, n = best.vs_baseline
        verdict = "beyond 2 s.e." if se is not None and mean > 2 * se else "inside the noise: not a demonstrated gain"
        line = head + f"; vs {best.vs_baseline_label}: {_diff(best.vs_baseline)} points paired over {n} seeds: {verdict}"
    else:
        line = head
    return [line, "(validation split; claim a gain on the test split with `verify`)"]


def _single_seed_verdict(best: LeaderboardRow, top: list[LeaderboardRow]) -> list[str]:
    """The best plan against the best baseline, one seed each (nothing was confirmed)."""
    baselines = [r for r in top if r.baseline]
    se = binomial_se(best.val_acc, best.n_val)
    if baselines and not best.baseline and se is not None:
        rival = max(baselines, key=lambda r: r.val_acc)
        margin = best.val_acc - rival.val_acc
        # Two independent accuracies on the same split size: the s.e. of the difference.
        se_diff = difference_se(best.val_acc, best.n_val, rival.val_acc, rival.n_val)
        verdict = "inside the noise: not a demonstrated gain" if margin <= 2 * se_diff else "beyond 2 s.e."
        return [f"best vs best baseline ({rival.baseline}): {100 * margin:+.2f} points, s.e. of the gap "
                f"{_pts(se_diff)}: {verdict}; one seed each: claim gains only with `verify` on the test split"]
    if se is not None:
        return [f"noise floor: one standard error of the best val acc is {_pts(se)} points (n={best.n_val})"]
    return []


def _ranking_lines(summary: SearchSummary, top: int) -> list[str]:
    rows = summary.top[:top]
    if not rows:
        return ["no completed trial yet"]
    confirmed = any(r.confirmed is not None for r in rows)
    lines = _table_lines(rows, confirmed)
    if summary.multi_objective:
        lines.append("* on the Pareto front of val accuracy (max) vs total epochs (min)")
    epochs = {r.total_epochs for r in summary.top if r.total_epochs is not None}
    if len(epochs) > 1:
        lines.append(f"note: plans trained {min(epochs)} to {max(epochs)} epochs in all; longer training wins on its "
                     "own: compare at equal epochs (`verify`)")
    best = rows[0]
    if confirmed and best.confirmed is not None:
        return lines + _confirmed_verdict(best)
    return lines + _single_seed_verdict(best, summary.top)


def _trials_words(summary: SearchSummary) -> str:
    c = summary.counts
    trained = c.get('COMPLETE', 0) - summary.n_confirmation_runs - summary.n_repeats
    words = (f"{summary.done}/{summary.budget} trials: {trained} complete, "
             f"{c.get('PRUNED', 0)} pruned, {c.get('FAIL', 0) - summary.n_interrupted - summary.n_infrastructure} failed")
    if summary.n_repeats:
        words += f" (+{summary.n_repeats} repeats of finished plans, answered from the study, off the budget)"
    if summary.n_interrupted:
        words += f" (+{summary.n_interrupted} cut short by a stop)"
    if summary.n_infrastructure:
        words += f" (+{summary.n_infrastructure} failed by the infrastructure, retried off the budget)"
    if summary.n_confirmation_runs:
        words += f"; {summary.n_confirmation_runs} confirmation runs"
    return words


def format_leaderboard(summary: SearchSummary, top: int = 10) -> str:
    """The summary as text: the top plans, the noise floor, where the study and best plan are.

    Accuracies are percentages with their sample size (n validation images) or their seed count;
    ``±`` is one standard error.
    """
    lines = _ranking_lines(summary, top)
    lines.append("")
    lines += [f"note:      {n}" for n in summary.notes]
    lines.append(f"study:     {summary.study} ({summary.db_path}): {_trials_words(summary)}, "
                 f"{fmt_duration(summary.elapsed_s)}")
    if summary.epochs_trained or summary.epochs_reused:
        rate = "" if summary.images_per_s is None else \
            f"; {summary.images_per_s:,.0f} training images/s {summary.throughput_on}"
        lines.append(f"epochs:    {epochs_line(summary.epochs_trained, summary.epochs_reused, summary.cache)}{rate}")
    if summary.teacher_epochs_served or summary.teacher_wait_s:
        lines.append(f"teacher:   logits read from the store in {summary.teacher_epochs_served:g} of the trained "
                     f"epochs (other trials had run the teacher over them); {summary.teacher_wait_s:.1f} s waited for "
                     "trials computing them")
    if summary.interrupted:
        why = {"timeout": "--timeout reached", "interrupted": "interrupted",
               "infrastructure": "infrastructure failures (retried, still failing)"}.get(summary.stop_reason,
                                                                               summary.stop_reason)
        lines.append(f"stopped:   {why} before the budget; continue with --resume --study {summary.study}")
    if summary.best_plan_path is not None:
        lines.append(f"best plan: {summary.best_plan_path}")
    lines.append(f"dashboard: optuna-dashboard {summary.storage_url}")
    return "\n".join(lines)


__all__ = ["epochs_line", "fmt_duration", "format_leaderboard", "progress_line"]
