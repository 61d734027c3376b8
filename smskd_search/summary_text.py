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
    best = f"best {100 * p.best_value:.2f}%" if p.best_value is not None else "best -"
    return (f"[{p.elapsed_s:5.0f}s] done {p.done}/{p.budget}  running {p.running}  "
            f"pruned {p.pruned}  failed {p.failed}  {best}")


def format_leaderboard(summary: SearchSummary, top: int = 10) -> str:
    """The summary as text: the top plans, the noise floor, where the study and best plan are."""
    lines: list[str] = []
    rows = summary.top[:top]
    if rows:
        def acc_cell(r: LeaderboardRow) -> str:
            se = binomial_se(r.val_acc, r.n_val)
            return (f"{r.val_acc:.4f}" + (f" ± {se:.4f}" if se is not None else "")
                    + (f" (n={r.n_val})" if r.n_val else ""))

        columns: list[tuple[str, list[str], str]] = [
            ("rank", [f"{r.rank}{'*' if r.pareto else ''}" for r in rows], ">"),
            ("trial", [f"#{r.number}" for r in rows], "<"),
            ("val acc", [acc_cell(r) for r in rows], "<"),
            ("epochs", ["-" if r.total_epochs is None else str(r.total_epochs) for r in rows], ">"),
            ("lambda_ref", ["-" if r.lambda_ref is None else f"{r.lambda_ref:.3g}" for r in rows], "<"),
            ("mode", [(r.weight_mode or "-") + ("+bm" if r.normalize == "batch_mean" else "") for r in rows], "<"),
        ]
        widths = [max(len(title), *(len(c) for c in cells)) for title, cells, _ in columns]
        lines.append("  ".join(f"{title:{align}{w}}" for (title, _, align), w in zip(columns, widths)) + "  stages")
        for i, r in enumerate(rows):
            cells = "  ".join(f"{col[1][i]:{col[2]}{w}}" for col, w in zip(columns, widths))
            lines.append(f"{cells}  {r.sequence}" + (f"   [baseline {r.baseline}]" if r.baseline else ""))
        if summary.multi_objective:
            lines.append("* on the Pareto front of val accuracy (max) vs total epochs (min)")
        best = max(rows, key=lambda r: r.val_acc)
        baselines = [r for r in summary.top if r.baseline]
        se = binomial_se(best.val_acc, best.n_val)
        if baselines and not best.baseline and se is not None:
            rival = max(baselines, key=lambda r: r.val_acc)
            margin = best.val_acc - rival.val_acc
            # Two independent accuracies on the same split size: the s.e. of the difference.
            se_diff = difference_se(best.val_acc, best.n_val, rival.val_acc, rival.n_val)
            verdict = "inside the noise: not a demonstrated gain" if margin <= 2 * se_diff else "beyond 2 s.e."
            lines.append(f"best vs best baseline ({rival.baseline}): {margin:+.4f}, s.e. of the gap "
                         f"{se_diff:.4f}: {verdict}; claim gains only with `verify` on the test split")
        elif se is not None:
            lines.append(f"noise floor: one standard error of the best val acc is {se:.4f} (n={best.n_val})")
    else:
        lines.append("no completed trial yet")
    c = summary.counts
    trials_word = (f"{summary.done}/{summary.budget} trials: {c.get('COMPLETE', 0)} complete, "
                   f"{c.get('PRUNED', 0)} pruned, {c.get('FAIL', 0) - summary.n_interrupted} failed")
    if summary.n_interrupted:
        trials_word += f" (+{summary.n_interrupted} cut short by a stop)"
    lines.append("")
    lines.append(f"study:     {summary.study} ({summary.db_path}): {trials_word}, {fmt_duration(summary.elapsed_s)}")
    if summary.interrupted:
        why = {"timeout": "--timeout reached", "interrupted": "interrupted"}.get(summary.stop_reason,
                                                                               summary.stop_reason)
        lines.append(f"stopped:   {why} before the budget; continue with --resume --study {summary.study}")
    if summary.best_plan_path is not None:
        lines.append(f"best plan: {summary.best_plan_path}")
    lines.append(f"dashboard: optuna-dashboard {summary.storage_url}")
    return "\n".join(lines)


__all__ = ["fmt_duration", "format_leaderboard", "progress_line"]
