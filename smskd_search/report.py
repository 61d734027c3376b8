"""One self-contained HTML page of what a study learned (plotly; plotly.js inlined once, no CDN).

Every figure sits in ``<div id="fig-...">`` with its figure JSON beside it in
``<script type="application/json" id="fig-...-json">``, drawn by one inline script: the page opens
offline, and tests (or users) can read each figure's data without a browser.

The page puts the noise floor first (docs/honest-numbers.md): a search on a validation split of a few
hundred images can crown noise, so the winner's margin over the best enqueued baseline is set
against the binomial standard error of the gap, in words.
"""

from __future__ import annotations

import datetime as _dt
import html
import json
import math
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import optuna
import plotly.graph_objects as go
import plotly.io as pio
import yaml
from optuna.trial import FrozenTrial, TrialState

from smskd_search.export import find_study_db, open_study, ranked_trials
from smskd_search.search.record import Confirmed, StudyAttrs, TrialRecord, confirmations, record, records
from smskd_search.search.storage import counts_by_state
from smskd_search.stats import binomial_se, difference_se

TOP_K = 10
# fANOVA on fewer completed trials than this says more about the sampler than about the space.
MIN_IMPORTANCE_TRIALS = 4

# Figure ids are part of the page's contract (tests and users look them up).
FIG_HISTORY = "fig-history"
FIG_STAGES = "fig-stages"
FIG_IMPORTANCE = "fig-importance"
FIG_METHOD_STAGE = "fig-method-stage"
FIG_TRANSITIONS = "fig-transitions"
FIG_ACC_STAGES = "fig-acc-stages"
FIG_ACC_EPOCHS = "fig-acc-epochs"
FIG_ACC_LAMBDA = "fig-acc-lambda"
FIG_NOISE = "fig-noise"
FIGURE_IDS = (FIG_NOISE, FIG_HISTORY, FIG_STAGES, FIG_IMPORTANCE, FIG_METHOD_STAGE, FIG_TRANSITIONS,
              FIG_ACC_STAGES, FIG_ACC_EPOCHS, FIG_ACC_LAMBDA)
TABLE_TOP = "top-plans"
TABLE_BASELINES = "baselines"
NOISE_ID = "noise-floor"

_COMPLETE = "#1f77b4"
_BASELINE = "#d62728"
_PRUNED = "#9a9a9a"
_BEST = "#2ca02c"


# ----------------------------------------------------------------------------------- trial rows
@dataclass
class TrialRow:
    number: int
    state: str
    value: float | None  # val acc; for PRUNED the last stage value reached
    n_val: int | None
    sequence: str
    methods: list[str]
    epochs: list[int]
    total_epochs: int | None
    lambda_ref: float | None  # None where no reference term acts (one stage, or weight mode none)
    weight_mode: str | None
    normalize: str | None
    baseline: str | None
    stages: list[tuple[int, float]]
    reason: str | None = None

    @property
    def n_stages(self) -> int:
        return len(self.methods)

    @property
    def se(self) -> float | None:
        return binomial_se(self.value, self.n_val) if self.value is not None else None

    @property
    def label(self) -> str:
        tag = f" [{self.baseline}]" if self.baseline else ""
        return f"#{self.number} {self.sequence}{tag}"


def trial_row(trial: FrozenTrial | TrialRecord) -> TrialRow:
    t = record(trial)
    plan = t.plan
    stages = plan.stages if plan is not None else []
    methods = [s.method for s in stages]
    epochs = [s.epochs for s in stages]
    mode = plan.reference.weight_mode if plan is not None and len(stages) > 1 else None
    acting = mode is not None and mode != "none"
    reason = t.attrs.fail_reason if t.state == TrialState.FAIL else None
    points = t.stage_values
    if t.state == TrialState.PRUNED and t.intermediate_values:
        # Stopped at a rung inside a stage: the curve ends where the scheduler stopped it.
        last = max(t.intermediate_values)
        if not points or last > points[-1][0]:
            points.append((int(last), float(t.intermediate_values[last])))
    return TrialRow(
        number=t.number, state=t.state.name, value=t.last_value, n_val=t.n_val,
        sequence=t.sequence or " -> ".join(f"{m}({e})" for m, e in zip(methods, epochs)) or "?",
        methods=methods, epochs=epochs,
        total_epochs=t.total_epochs if t.total_epochs is not None else (sum(epochs) or None),
        lambda_ref=float(plan.reference.lambda_ref) if acting and plan is not None else None,
        weight_mode=mode, normalize=plan.reference.normalize if acting and plan is not None else None,
        baseline=t.attrs.baseline, stages=points, reason=reason,
    )


# ---------------------------------------------------------------------------------- noise floor
@dataclass
class NoiseFloor:
    """The banner's verdict on the winner's margin over the best baseline.

    ``basis`` says what was compared: ``confirmed`` (means over the confirmation seeds, the gap
    paired by seed; ``seeds`` of them) or ``single-seed`` (each trial's one search run: nothing was
    confirmed).
    """

    verdict: str  # no-trials | no-baseline | winner-is-baseline | inside | within-2se | beyond-2se
    sentence: str
    winner: TrialRow | None = None
    rival: TrialRow | None = None
    margin: float | None = None
    se_winner: float | None = None
    se_gap: float | None = None
    notes: list[str] = field(default_factory=list)
    basis: str = "single-seed"
    seeds: int = 0


def _pts(x: float) -> str:
    return f"{100 * x:.2f}"


_ONE_SEED = " These are single-seed values: no plan was confirmed on fresh seeds."
_CLAIM = " Claim it only from `smskd-search verify` (test split, equal epochs, several seeds)."


def _verdict(margin: float, se_gap: float) -> tuple[str, str]:
    if margin <= se_gap:
        return "inside", (" The margin is INSIDE the noise floor: this search has not shown that the "
                          "sequence beats the single method.")
    if margin <= 2 * se_gap:
        return "within-2se", " The margin is above one standard error but within two: not a demonstrated gain."
    return "beyond-2se", (" The margin is beyond two standard errors on validation; it is still "
                          "a validation number chosen by the search.")


def _epochs_tail(win: TrialRow, rival: TrialRow) -> str:
    if win.total_epochs and rival.total_epochs and win.total_epochs != rival.total_epochs:
        return (f" The two did not train equally long ({win.total_epochs} against {rival.total_epochs} epochs), "
                "so part of the gap may be training time, not the sequence.")
    return ""


def noise_floor(ranked: Sequence[TrialRow], baselines: Sequence[TrialRow],
                confirmed: Mapping[int, Confirmed] | None = None) -> NoiseFloor:
    """The winner's margin over the best completed baseline, judged against the standard error of the gap.

    Like with like: where the winner was confirmed (``confirmed``, by trial number; the ranking puts
    confirmed plans first), confirmed means against the best confirmed baseline, the gap paired by
    seed; otherwise each trial's single search run, with the binomial s.e. of the gap,
    sqrt(se1^2 + se2^2). A gap within 1 s.e. is inside the noise floor; within 2 s.e. it is still
    no demonstrated gain.
    """
    notes = [f"baseline {b.baseline} (trial #{b.number}) was {b.state.lower()}, so it is not compared"
             for b in baselines if b.state != "COMPLETE"]
    if not ranked:
        return NoiseFloor("no-trials", "No trial has completed yet: there is no winner to judge.", notes=notes)
    conf = confirmed or {}
    if ranked[0].number in conf:
        return _confirmed_floor(ranked, baselines, conf, notes)
    return _single_seed_floor(ranked, baselines, notes)


def _single_seed_floor(ranked: Sequence[TrialRow], baselines: Sequence[TrialRow], notes: list[str]) -> NoiseFloor:
    win = ranked[0]
    assert win.value is not None
    se_w = win.se
    floor = f"{_pts(se_w)} points at n_val={win.n_val}" if se_w is not None else "unknown (n_val not recorded)"
    done = [b for b in baselines if b.state == "COMPLETE" and b.value is not None]
    if not done:
        return NoiseFloor("no-baseline", f"No completed baseline to compare with: the winner #{win.number} "
                          f"({win.sequence}) has val accuracy {_pts(win.value)}% with a standard error of {floor}; "
                          "whether it beats a single method is not measured here.",
                          winner=win, se_winner=se_w, notes=notes)
    rival = max(done, key=lambda b: (b.value, -b.number))
    assert rival.value is not None
    searched = [r for r in ranked if not r.baseline and r.value is not None]
    if win.baseline:
        behind = ""
        if searched:
            best = searched[0]
            assert best.value is not None
            gap = win.value - best.value
            where = "ties it" if gap == 0 else f"is {_pts(gap)} points behind"
            behind = f" The best searched plan, #{best.number} ({best.sequence}), {where}."
        return NoiseFloor("winner-is-baseline", f"The best completed trial is the baseline {win.baseline} "
                          f"(#{win.number}, {_pts(win.value)}%; binomial standard error {floor}): no searched plan beat "
                          f"the single method on validation.{behind}{_ONE_SEED}", winner=win, rival=rival, margin=0.0,
                          se_winner=se_w, notes=notes)
    margin = win.value - rival.value
    if se_w is None or rival.se is None:
        return NoiseFloor("no-baseline", f"The winner #{win.number} leads baseline {rival.baseline} by "
                          f"{_pts(margin)} points, but the validation size is not recorded, so its noise floor "
                          "is unknown.", winner=win, rival=rival, margin=margin, notes=notes)
    se_gap = difference_se(win.value, win.n_val, rival.value, rival.n_val)
    head = (f"The winner #{win.number} ({win.sequence}, val acc {_pts(win.value)}%) leads the best baseline "
            f"{rival.baseline} (#{rival.number}, {_pts(rival.value)}%) by {_pts(margin)} points; the binomial "
            f"standard error of one accuracy here is {floor}, and of the gap {_pts(se_gap)} points.")
    verdict, tail = _verdict(margin, se_gap)
    tail += _epochs_tail(win, rival) + _ONE_SEED + _CLAIM
    return NoiseFloor(verdict, head + tail, winner=win, rival=rival, margin=margin, se_winner=se_w,
                      se_gap=se_gap, notes=notes)


def _mean_text(c: Confirmed) -> str:
    se = f" ± {_pts(c.se)}" if c.se is not None else ""
    return f"confirmed mean {_pts(c.mean)}%{se} over {c.n} seed{'s' if c.n != 1 else ''}"


def _gap(a: Confirmed, b: Confirmed, a_row: TrialRow, b_row: TrialRow) -> tuple[float, float, int]:
    """Mean and s.e. of a - b paired by seed (``n`` seeds); where that has no s.e. (one shared seed,
    or none), the difference of the means with the binomial s.e. of two accuracies."""
    paired = a.paired_difference(b)
    if paired is not None and paired[1] is not None:
        return paired[0], paired[1], paired[2]
    margin = paired[0] if paired is not None else a.mean - b.mean
    return margin, difference_se(a.mean, a_row.n_val, b.mean, b_row.n_val), paired[2] if paired is not None else 0


def _confirmed_floor(ranked: Sequence[TrialRow], baselines: Sequence[TrialRow], conf: Mapping[int, Confirmed],
                     notes: list[str]) -> NoiseFloor:
    win = ranked[0]
    cw = conf[win.number]
    done = [b for b in baselines if b.state == "COMPLETE" and b.number in conf]
    if win.baseline:
        behind = ""
        searched = [r for r in ranked if not r.baseline and r.number in conf]
        if searched:
            best = searched[0]
            gap, se, n = _gap(conf[best.number], cw, best, win)
            where = "ties it" if gap == 0 else f"{'trails' if gap < 0 else 'leads'} it by {_pts(abs(gap))} ± {_pts(se)} points"
            seed_word = f"paired over {n} seeds" if n else "difference of the means"
            once = ""
            if best.value is not None and win.value is not None and (best.value - win.value) * gap < 0:
                once = (f"; on its one search seed it {'led' if best.value > win.value else 'trailed'} by "
                        f"{_pts(abs(best.value - win.value))}, which the fresh seeds did not bear out")
            behind = (f" The best searched plan, #{best.number} ({best.sequence}, {_mean_text(conf[best.number])}), "
                      f"{where} ({seed_word}){once}.")
        return NoiseFloor("winner-is-baseline", f"The best plan on the confirmation seeds is the baseline "
                          f"{win.baseline} (#{win.number}, {_mean_text(cw)}): no searched plan beat the single "
                          f"method when confirmed.{behind}", rival=win, margin=0.0, winner=win, se_winner=cw.se,
                          notes=notes, basis="confirmed", seeds=cw.n)
    if not done:
        return NoiseFloor("no-baseline", f"The winner #{win.number} ({win.sequence}) has a {_mean_text(cw)}; no "
                          "baseline was confirmed on those seeds, so whether it beats a single method is not "
                          "measured here.", winner=win, se_winner=cw.se,
                          notes=notes, basis="confirmed", seeds=cw.n)
    rival = max(done, key=lambda b: (conf[b.number].mean, -b.number))
    margin, se_gap, n = _gap(cw, conf[rival.number], win, rival)
    how = f"paired over {n} seeds" if n else "difference of the means"
    head = (f"On the confirmation seeds, the winner #{win.number} ({win.sequence}, {_mean_text(cw)}) "
            f"{'leads' if margin >= 0 else 'trails'} the best baseline {rival.baseline} (#{rival.number}, "
            f"{_mean_text(conf[rival.number])}) by {_pts(abs(margin))} ± {_pts(se_gap)} points ({how}).")
    verdict, tail = _verdict(margin, se_gap)
    tail += _epochs_tail(win, rival) + _CLAIM
    return NoiseFloor(verdict, head + tail, rival=rival, margin=margin, se_gap=se_gap, winner=win, se_winner=cw.se,
                          notes=notes, basis="confirmed", seeds=cw.n)


# --------------------------------------------------------------------------------------- figures
def _layout(fig: go.Figure, title: str, x: str, y: str, **kw: Any) -> go.Figure:
    fig.update_layout(title={"text": title, "x": 0.01, "font": {"size": 15}}, xaxis_title=x, yaxis_title=y,
                      template="plotly_white", height=kw.pop("height", 420), margin={"l": 60, "r": 20, "t": 50, "b": 50},
                      legend={"orientation": "h", "y": -0.2}, **kw)
    return fig


def _message(fig: go.Figure, text: str) -> go.Figure:
    fig.add_annotation(text=text, showarrow=False, xref="paper", yref="paper", x=0.5, y=0.5,
                       font={"size": 13, "color": "#555"})
    fig.update_xaxes(visible=False)
    fig.update_yaxes(visible=False)
    return fig


def fig_history(rows: Sequence[TrialRow]) -> go.Figure:
    fig = go.Figure()
    done = [r for r in rows if r.state == "COMPLETE" and r.value is not None]
    pruned = [r for r in rows if r.state == "PRUNED" and r.value is not None]
    for name, group, color, symbol in (("completed", [r for r in done if not r.baseline], _COMPLETE, "circle"),
                                       ("baseline", [r for r in done if r.baseline], _BASELINE, "diamond")):
        fig.add_trace(go.Scatter(x=[r.number for r in group], y=[r.value for r in group], mode="markers", name=name,
                                 marker={"color": color, "symbol": symbol, "size": 9}, text=[r.label for r in group],
                                 hovertemplate="%{text}<br>val acc %{y:.4f}<extra></extra>"))
    fig.add_trace(go.Scatter(x=[r.number for r in pruned], y=[r.value for r in pruned], mode="markers",
                             name="pruned (last stage value)", marker={"color": _PRUNED, "symbol": "x", "size": 8},
                             text=[r.label for r in pruned], hovertemplate="%{text}<br>pruned at %{y:.4f}<extra></extra>"))
    best, xs, ys = -math.inf, [], []
    for r in sorted(done, key=lambda r: r.number):
        best = max(best, r.value)
        xs.append(r.number)
        ys.append(best)
    fig.add_trace(go.Scatter(x=xs, y=ys, mode="lines", name="best so far", line={"color": _BEST, "shape": "hv", "width": 2}))
    return _layout(fig, "Optimisation history (best so far)", "trial number", "val accuracy")


def fig_stages(rows: Sequence[TrialRow]) -> go.Figure:
    fig = go.Figure()
    shown: set[str] = set()
    order = sorted((r for r in rows if r.stages), key=lambda r: (r.state == "COMPLETE", r.value or 0.0))
    for r in order:  # completed (and the best) drawn last, on top of the pruned ones
        if r.state == "PRUNED":
            group, line, marker = "pruned", {"color": _PRUNED, "dash": "dash", "width": 1.5}, "x"
        elif r.baseline:
            group, line, marker = "baseline", {"color": _BASELINE, "dash": "dot", "width": 2}, "diamond"
        elif r.state == "COMPLETE":
            group, line, marker = "completed", {"color": _COMPLETE, "width": 1.5}, "circle"
        else:
            group, line, marker = "failed / running", {"color": "#ff7f0e", "dash": "dashdot", "width": 1}, "square"
        fig.add_trace(go.Scatter(
            x=[c for c, _ in r.stages], y=[a for _, a in r.stages], mode="lines+markers",
            name=group, legendgroup=group, showlegend=group not in shown, line=line,
            marker={"symbol": marker, "size": 7}, text=[r.label] * len(r.stages),
            hovertemplate=f"%{{text}} ({r.state.lower()})<br>%{{x}} epochs: val acc %{{y:.4f}}<extra></extra>",
        ))
        shown.add(group)
    fig = _layout(fig, "Stage-level val accuracy (pruned: grey dashed)",
                  "cumulative epochs", "val accuracy at stage end")
    fig.update_xaxes(rangemode="tozero")
    return fig


def param_importances(study: optuna.Study) -> tuple[dict[str, float] | None, str]:
    """fANOVA importances over completed trials that have parameters, computed on an in-memory copy."""
    trials = [t for t in study.get_trials(deepcopy=True, states=(TrialState.COMPLETE,)) if t.params and t.values]
    if len(trials) < MIN_IMPORTANCE_TRIALS:
        return None, (f"Parameter importances need at least {MIN_IMPORTANCE_TRIALS} completed trials with "
                      f"sampled parameters; this study has {len(trials)}.")
    level = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # no "new study created in memory" line
    try:
        copy = optuna.create_study(directions=study.directions)
    finally:
        optuna.logging.set_verbosity(level)
    copy.add_trials(trials)
    target = (lambda t: t.values[0]) if len(study.directions) > 1 else None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            imp = optuna.importance.get_param_importances(
                copy, evaluator=optuna.importance.FanovaImportanceEvaluator(seed=0), target=target)
    except (RuntimeError, ValueError) as exc:
        return None, f"Parameter importances could not be computed: {exc}"
    if not imp:
        return None, "No parameter was sampled in every completed trial: importances are undefined."
    return dict(imp), f"fANOVA over {len(trials)} completed trials (parameters present in all of them)."


def fig_importance(imp: dict[str, float] | None, note: str) -> go.Figure:
    fig = go.Figure()
    if imp:
        names = list(imp)[::-1]
        fig.add_trace(go.Bar(x=[imp[n] for n in names], y=names, orientation="h", marker={"color": _COMPLETE},
                             name="importance", hovertemplate="%{y}: %{x:.3f}<extra></extra>"))
        fig = _layout(fig, "Parameter importances (fANOVA)", "importance (normalised)", "")
        fig.add_annotation(text=note, showarrow=False, xref="paper", yref="paper", x=0, y=1.06, xanchor="left",
                           font={"size": 11, "color": "#555"})
        return fig
    fig.add_trace(go.Bar(x=[], y=[], name="importance"))
    return _message(_layout(fig, "Parameter importances (fANOVA)", "", ""), note)


def _methods_in(rows: Sequence[TrialRow]) -> list[str]:
    seen: list[str] = []
    for r in rows:
        for m in r.methods:
            if m not in seen:
                seen.append(m)
    return seen


def _counts_scale(title: str, z: list[list[int]]) -> dict[str, Any]:
    # From zero (an absent method is "0 trials", not the palest seen count) with whole-number ticks:
    # plotly's own (0.2, 0.4...) suggest fractional trials.
    peak = max((v for row in z for v in row), default=0)
    return {"zmin": 0, "zmax": max(peak, 1), "colorbar": {"title": title, "dtick": max(1, math.ceil(peak / 8))}}


def fig_method_stage(top: Sequence[TrialRow], methods: Sequence[str]) -> go.Figure:
    n = max((r.n_stages for r in top), default=0)
    z = [[sum(1 for r in top if len(r.methods) > k and r.methods[k] == m) for m in methods] for k in range(n)]
    fig = go.Figure(go.Heatmap(z=z, x=list(methods), y=[f"stage {k + 1}" for k in range(n)], colorscale="Blues",
                               **_counts_scale("trials", z),
                               texttemplate="%{z}", hovertemplate="%{y}, %{x}: %{z} trials<extra></extra>",
                               name="method x stage"))
    fig = _layout(fig, f"Method at each stage, top {len(top)} completed trials", "method", "")
    fig.update_yaxes(autorange="reversed")
    return _message(fig, "no completed trial yet") if not top else fig


def fig_transitions(top: Sequence[TrialRow], methods: Sequence[str]) -> go.Figure:
    z = [[0 for _ in methods] for _ in methods]
    pairs = 0
    for r in top:
        for a, b in zip(r.methods, r.methods[1:]):
            z[methods.index(a)][methods.index(b)] += 1
            pairs += 1
    fig = go.Figure(go.Heatmap(z=z, x=list(methods), y=list(methods), colorscale="Purples", texttemplate="%{z}",
                               **_counts_scale("count", z),
                               hovertemplate="%{y} -> %{x}: %{z}<extra></extra>", name="transitions"))
    fig = _layout(fig, f"Stage transitions, top {len(top)} completed trials", "to (next stage)", "from")
    fig.update_yaxes(autorange="reversed")
    return _message(fig, "no multi-stage plan among the top trials") if pairs == 0 else fig


def _acc_scatter(rows: Sequence[TrialRow], x_of, title: str, x_title: str, log_x: bool = False,
                 jitter: bool = False, x_range: tuple[float, float] | None = None) -> go.Figure:
    fig = go.Figure()
    for name, color, symbol, group in (("completed", _COMPLETE, "circle", [r for r in rows if not r.baseline]),
                                       ("baseline", _BASELINE, "diamond", [r for r in rows if r.baseline])):
        pts = [(x_of(r), r) for r in group if x_of(r) is not None]
        # Deterministic jitter keeps equal x values apart without hiding which x they belong to.
        xs = [x + ((r.number % 7) - 3) * 0.03 if jitter else x for x, r in pts]
        fig.add_trace(go.Scatter(
            x=xs, y=[r.value for _, r in pts], mode="markers", name=name,
            marker={"color": color, "symbol": symbol, "size": 9},
            error_y={"type": "data", "array": [r.se or 0.0 for _, r in pts], "thickness": 1, "color": color},
            text=[r.label for _, r in pts], hovertemplate="%{text}<br>val acc %{y:.4f}<extra></extra>",
        ))
    fig = _layout(fig, title, x_title, "val accuracy (± 1 s.e.)")
    if log_x:
        # The searched range (when known) shows where in it the plans sit; one tick per decade.
        rng = [math.log10(x_range[0]) - 0.1, math.log10(x_range[1]) + 0.1] if x_range and x_range[0] > 0 else None
        fig.update_xaxes(type="log", dtick=1, range=rng)
    elif jitter:
        xs = [x for r in rows if (x := x_of(r)) is not None]
        if xs:
            fig.update_xaxes(dtick=max(1, math.ceil((max(xs) - min(xs)) / 10)))  # whole numbers only
    if not any(len(t.x or ()) for t in fig.data):
        _message(fig, "no completed trial with this setting")
    return fig


# ------------------------------------------------------------------------------------------ page
@dataclass
class ReportData:
    study: optuna.Study
    db: Path
    rows: list[TrialRow]
    ranked: list[TrialRow]
    baselines: list[TrialRow]
    noise: NoiseFloor
    importances: dict[str, float] | None
    importance_note: str
    figures: dict[str, go.Figure]
    # Confirmation runs by the trial they confirm (the ranking puts confirmed plans first, by mean).
    confirmed: dict[int, Confirmed] = field(default_factory=dict)


def _lambda_range(study: optuna.Study) -> tuple[float, float] | None:
    """The searched lambda_ref range, from the space text stored in the study."""
    try:
        lr = ((yaml.safe_load(StudyAttrs.of(study).space_yaml or "") or {}).get("search") or {}).get("lambda_ref")
        return (float(lr["low"]), float(lr["high"])) if lr else None
    except (yaml.YAMLError, AttributeError, KeyError, TypeError, ValueError):
        return None


def collect(study: optuna.Study, db: Path, top_k: int = TOP_K) -> ReportData:
    # The search's trials; the confirmation runs after the budget are re-runs of some of them on
    # other seeds (the ranking uses them), not points of the search.
    every = records(study.get_trials(deepcopy=False))
    trials = [t for t in every if not t.is_confirmation]
    rows = [trial_row(t) for t in trials]
    by_number = {r.number: r for r in rows}
    ranked = [by_number[t.number] for t in ranked_trials(study)]
    # A baseline re-run after an interruption is one baseline: keep its latest attempt.
    latest: dict[str, TrialRow] = {}
    for r in rows:
        if r.baseline and not (r.state == "FAIL" and any(o.baseline == r.baseline and o.number > r.number for o in rows)):
            latest[r.baseline] = r
    baselines = sorted(latest.values(), key=lambda r: r.number)
    confirmed = confirmations(every)
    noise = noise_floor(ranked, baselines, confirmed)
    imp, note = param_importances(study)
    top = ranked[:top_k]
    methods = _methods_in(top) or _methods_in(rows)
    done = [r for r in rows if r.state == "COMPLETE" and r.value is not None]
    lam_range = _lambda_range(study)
    figures = {
        FIG_NOISE: fig_noise(ranked[:top_k], baselines, noise),
        FIG_HISTORY: fig_history(rows),
        FIG_STAGES: fig_stages(rows),
        FIG_IMPORTANCE: fig_importance(imp, note),
        FIG_METHOD_STAGE: fig_method_stage(top, methods),
        FIG_TRANSITIONS: fig_transitions(top, methods),
        FIG_ACC_STAGES: _acc_scatter(done, lambda r: r.n_stages or None, "Val accuracy against stage count",
                                     "number of stages", jitter=True),
        FIG_ACC_EPOCHS: _acc_scatter(done, lambda r: r.total_epochs, "Val accuracy against total epochs",
                                     "total epochs", jitter=True),
        FIG_ACC_LAMBDA: _acc_scatter(done, lambda r: r.lambda_ref,
                                     "Val accuracy against lambda_ref (active reference only)",
                                     "lambda_ref (log scale)", log_x=True, x_range=lam_range),
    }
    for fid, fig in figures.items():
        fig.update_layout(meta={"id": fid})
    return ReportData(study, db, rows, ranked, baselines, noise, imp, note, figures, confirmed)


def fig_noise(top: Sequence[TrialRow], baselines: Sequence[TrialRow], noise: NoiseFloor) -> go.Figure:
    """Top plans and the completed baselines with ± 2 s.e. bars, against the best baseline's value."""
    shown = list(top) + [b for b in baselines if b.state == "COMPLETE" and b not in top and b.value is not None]
    shown.sort(key=lambda r: r.value)
    fig = go.Figure()
    for name, color, group in (("searched plan", _COMPLETE, [r for r in shown if not r.baseline]),
                               ("baseline", _BASELINE, [r for r in shown if r.baseline])):
        fig.add_trace(go.Scatter(
            x=[r.value for r in group], y=[r.label for r in group], mode="markers", name=name,
            marker={"color": color, "size": 10, "symbol": "diamond" if name == "baseline" else "circle"},
            error_x={"type": "data", "array": [2 * (r.se or 0.0) for r in group], "thickness": 1.5, "color": color},
            hovertemplate="%{y}<br>val acc %{x:.4f}<extra></extra>",
        ))
    if noise.rival is not None and noise.rival.value is not None:
        fig.add_vline(x=noise.rival.value, line={"color": _BASELINE, "dash": "dash", "width": 1},
                      annotation_text=f"best baseline {noise.rival.baseline}", annotation_position="top")
    height = max(300, 60 + 28 * len(shown))
    fig = _layout(fig, "Top plans beside the baselines: val accuracy ± 2 s.e. (binomial)", "val accuracy", "",
                  height=height)
    fig.update_yaxes(type="category", categoryorder="array", categoryarray=[r.label for r in shown])
    if not shown:
        _message(fig, "no completed trial yet")
    return fig


def _cell(v: Any) -> str:
    return html.escape("" if v is None else str(v))


def _acc_cell(r: TrialRow) -> str:
    if r.value is None:
        return "-"
    se = f" ± {_pts(r.se)}" if r.se is not None else ""
    n = f" (n={r.n_val})" if r.n_val else ""
    return f"{_pts(r.value)}%{se}{n}"


def _ref_cell(r: TrialRow) -> str:
    if r.n_stages < 2:
        return "-"
    if r.lambda_ref is None:
        return r.weight_mode or "-"
    norm = "+bm" if r.normalize == "batch_mean" else ""
    return f"{r.lambda_ref:.3g} {r.weight_mode}{norm}"


def _confirmed_cell(c: Confirmed | None) -> str:
    if c is None:
        return "-"
    se = f" ± {_pts(c.se)}" if c.se is not None else ""
    return f"{_pts(c.mean)}%{se} ({c.n} seed{'s' if c.n != 1 else ''})"


def _top_table(ranked: Sequence[TrialRow], noise: NoiseFloor, top_k: int,
               confirmed: dict[int, Confirmed] | None = None) -> str:
    confirmed = confirmed or {}
    head = ("<tr><th>rank</th><th>trial</th><th>stages</th><th>epochs</th><th>&lambda;<sub>ref</sub> / weights</th>"
            "<th>val acc ± s.e.</th><th>confirmed mean ± s.e.</th><th>gap to best baseline</th><th>gap / s.e.</th></tr>")
    body = []
    for i, r in enumerate(ranked[:top_k], start=1):
        gap = gap_se = "-"
        if noise.rival is not None and noise.rival.value is not None and r.value is not None:
            g = r.value - noise.rival.value
            gap = f"{'+' if g >= 0 else ''}{_pts(g)} pts"
            if r.se is not None and noise.rival.se is not None and (r.se or noise.rival.se):
                gap_se = f"{g / difference_se(r.value, r.n_val, noise.rival.value, noise.rival.n_val):+.2f}"
        kind = f' <span class="tag">{_cell(r.baseline)}</span>' if r.baseline else ""
        body.append(f"<tr><td>{i}</td><td>#{r.number}</td><td>{_cell(r.sequence)}{kind}</td><td>{_cell(r.total_epochs)}</td>"
                    f"<td>{_cell(_ref_cell(r))}</td><td>{_cell(_acc_cell(r))}</td>"
                    f"<td>{_cell(_confirmed_cell(confirmed.get(r.number)))}</td><td>{gap}</td><td>{gap_se}</td></tr>")
    if not body:
        body.append('<tr><td colspan="9">no completed trial</td></tr>')
    return f'<table id="{TABLE_TOP}"><caption>Top {min(top_k, len(ranked))} completed plans</caption>{head}{"".join(body)}</table>'


def _baseline_table(baselines: Sequence[TrialRow]) -> str:
    head = "<tr><th>baseline</th><th>trial</th><th>stages</th><th>state</th><th>val acc ± s.e.</th></tr>"
    body = [f"<tr><td>{_cell(b.baseline)}</td><td>#{b.number}</td><td>{_cell(b.sequence)}</td>"
            f"<td>{_cell(b.state.lower())}{' (partial value)' if b.state == 'PRUNED' else ''}</td>"
            f"<td>{_cell(_acc_cell(b))}</td></tr>" for b in baselines]
    if not body:
        body.append('<tr><td colspan="5">no baselines were enqueued in this study</td></tr>')
    return f'<table id="{TABLE_BASELINES}"><caption>Enqueued baselines</caption>{head}{"".join(body)}</table>'


def _failed_list(rows: Sequence[TrialRow]) -> str:
    failed = [r for r in rows if r.state == "FAIL"]
    if not failed:
        return ""
    items = "".join(f"<li>#{r.number} {_cell(r.sequence)}: {_cell(r.reason or 'no reason recorded')}</li>" for r in failed)
    return f'<details id="failed"><summary>{len(failed)} failed trial(s)</summary><ul>{items}</ul></details>'


_CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:0;background:#f6f7f9;color:#222}
main{max-width:1320px;margin:0 auto;padding:18px 20px 40px}
h1{font-size:22px;margin:4px 0 2px} h2{font-size:17px;margin:22px 0 8px}
.meta{color:#555;font-size:13px;line-height:1.5}
.meta code{background:#eceef1;padding:0 4px;border-radius:3px}
.callout{border-left:6px solid #e0a800;background:#fff8e1;padding:10px 14px;margin:14px 0;font-size:14px;line-height:1.5}
.callout.beyond-2se{border-color:#2ca02c;background:#eef8ee}
.callout ul{margin:6px 0 0;padding-left:20px;color:#555}
.tables{display:flex;flex-wrap:wrap;gap:16px;align-items:flex-start}
.tables table{width:auto;flex:0 1 auto}
table{border-collapse:collapse;background:#fff;font-size:13px;width:100%;box-shadow:0 1px 2px #0001}
caption{text-align:left;font-weight:600;padding:4px 0}
th,td{padding:4px 8px;border-bottom:1px solid #e5e7eb;text-align:left;white-space:nowrap}
th{background:#f0f2f5;font-weight:600}
.tag{background:#fde2e1;color:#a11;border-radius:3px;padding:0 4px;font-size:11px}
.grid{display:grid;grid-template-columns:1fr 1fr;gap:14px}
.figure{background:#fff;box-shadow:0 1px 2px #0001;min-height:300px}
.wide{grid-column:1 / span 2}
details{margin-top:10px;font-size:13px}
"""

_DRAW = """
for (const div of document.querySelectorAll("div.figure")) {
  const fig = JSON.parse(document.getElementById(div.id + "-json").textContent);
  Plotly.newPlot(div, fig.data, fig.layout, {responsive: true, displaylogo: false,
    modeBarButtonsToRemove: ["select2d", "lasso2d", "zoomIn2d", "zoomOut2d", "autoScale2d",
                             "hoverClosestCartesian", "hoverCompareCartesian", "toggleSpikelines"]});
}
"""


def _figure_block(fid: str, fig: go.Figure, wide: bool = False) -> str:
    # "</" inside a <script> would end it early; JSON allows "<\\/" for "</".
    data = pio.to_json(fig, validate=False).replace("</", "<\\/")
    cls = "figure wide" if wide else "figure"
    title = html.escape((fig.layout.title.text or fid) if fig.layout.title else fid)
    return (f'<div id="{fid}" class="{cls}" title="{title}"></div>\n'
            f'<script type="application/json" id="{fid}-json">{data}</script>')


def render_html(data: ReportData, top_k: int = TOP_K) -> str:
    from plotly.offline import get_plotlyjs

    st = data.study
    attrs = StudyAttrs.of(st)
    all_trials = records(st.get_trials(deepcopy=False))
    counts = counts_by_state(all_trials)
    interrupted = sum(1 for t in all_trials if t.interrupted)
    count_text = ", ".join(f"{n} {k.lower()}" for k, n in counts.items() if n) or "no trials"
    if interrupted:
        count_text += f" ({interrupted} cut short by a stop)"
    trained = sum(t.attrs.epochs_trained or 0 for t in all_trials)
    reused = sum(t.attrs.epochs_reused or 0 for t in all_trials)
    epochs_text = (f" Epochs: {trained} trained, {reused} reused from the stage cache."
                   if trained or reused else "")
    # A trial's own rate (images over its seconds in the trainable): the same whatever ran beside it
    # or how many sessions the study took (the search's summary gives the wall-clock rate per GPU).
    timed = [t.attrs for t in all_trials if t.attrs.images_trained and t.attrs.trial_seconds]
    images = sum(a.images_trained or 0 for a in timed)
    if images:
        seconds = sum(a.trial_seconds or 0.0 for a in timed)
        epochs_text += f" Training images: {images:,}, {images / seconds:,.0f} a second in a trial on average."
    served = sum(t.attrs.teacher_epochs_served or 0.0 for t in all_trials)
    if served:
        waited = sum(t.attrs.teacher_wait_s or 0.0 for t in all_trials)
        epochs_text += (f" Teacher logits read from the store in {served:g} of the trained epochs "
                        f"({waited:.1f} s waited for trials computing them).")
    n_vals = sorted({r.n_val for r in data.rows if r.n_val})
    n_text = ", ".join(str(n) for n in n_vals) or "not recorded"
    sha = (attrs.space_sha256 or "")[:12]
    teacher = (attrs.teacher_sha256 or "")[:12]
    noise = data.noise
    notes = "".join(f"<li>{html.escape(n)}</li>" for n in noise.notes)
    notes_html = f"<ul>{notes}</ul>" if notes else ""
    fig_html = "\n".join(_figure_block(fid, data.figures[fid], wide=fid == FIG_NOISE)
                         for fid in FIGURE_IDS)
    now = _dt.datetime.now().strftime("%Y-%m-%d %H:%M")
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<title>smskd-search report: {html.escape(st.study_name)}</title>
<style>{_CSS}</style>
<script type="text/javascript">{get_plotlyjs()}</script>
</head><body><main>
<h1>Study {html.escape(st.study_name)}</h1>
<div class="meta">
{html.escape(count_text)}; budget {_cell(attrs.budget)}; validation split n_val = {n_text}.{epochs_text}<br>
space <code>{_cell(attrs.space_path)}</code> (sha256 {sha}), teacher sha256 {teacher};
study <code>{html.escape(str(data.db))}</code>; generated {now}.<br>
All accuracies are on the validation split (the search never sees the test split); pruned trials show the
last stage value they reached and are never ranked.
</div>
<div id="{NOISE_ID}" class="callout {noise.verdict}"><b>Noise floor.</b> {html.escape(noise.sentence)}{notes_html}</div>
<h2>Top plans and baselines</h2>
<div class="tables">{_top_table(data.ranked, noise, top_k, data.confirmed)}{_baseline_table(data.baselines)}</div>
{_failed_list(data.rows)}
<h2>Figures</h2>
<div class="grid">
{fig_html}
</div>
</main>
<script type="text/javascript">{_DRAW}</script>
</body></html>
"""


def write_report(studies_dir: str | Path, study: str, out: str | Path | None = None, top_k: int = TOP_K) -> Path:
    """Write the study's report page (default ``<studies_dir>/<study>/report.html``) and return its path."""
    db = find_study_db(studies_dir, study)
    st = open_study(db)
    data = collect(st, db, top_k)
    path = Path(out) if out is not None else Path(studies_dir) / st.study_name / "report.html"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".part")
    tmp.write_text(render_html(data, top_k), encoding="utf-8")
    tmp.replace(path)  # a browser never opens half a page
    return path


def figures_in(html_text: str) -> dict[str, dict[str, Any]]:
    """The figure JSON embedded in a report page, by figure id (for tests and scripts)."""
    import re

    out = {}
    for m in re.finditer(r'<script type="application/json" id="([\w-]+)-json">(.*?)</script>', html_text, re.S):
        out[m.group(1)] = json.loads(m.group(2))
    return out


__all__ = [
    "FIGURE_IDS",
    "NoiseFloor",
    "ReportData",
    "TrialRow",
    "collect",
    "figures_in",
    "noise_floor",
    "render_html",
    "trial_row",
    "write_report",
]
