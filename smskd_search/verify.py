"""``verify``: does a plan beat its single-method baselines on the test split, beyond the noise?

A search ranks plans on a validation split and keeps the best: its winner's margin is biased
upwards. Here the plan and its rivals are re-run at equal total epochs on several seeds and scored
on the test split, which the search never saw:

- the plan itself;
- each distinct method of the plan alone, for the plan's total epochs (stage 1 has no reference,
  so the reference settings do not matter there);
- the plan with the reference switched off (weight mode ``none``), when the plan has 2+ stages
  and a reference: is it the sequence, or the anchoring, that helps?

The claim "the sequence beats a single method" is made only when the mean margin over the best
single method exceeds both the binomial noise of the test split (2 s.e. of the gap) and the
seed-to-seed spread (the larger seed std of the two rows). One seed gives no spread: no claim.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from smskd_search.plan import Plan, StageSpec
from smskd_search.stats import binomial_se, difference_se

DEFAULT_SEEDS = 3


@dataclass
class VerifyRow:
    label: str  # "plan", "single:<method>", "no-reference"
    plan: Plan
    seeds: list[int] = field(default_factory=list)
    test_acc: list[float] = field(default_factory=list)
    val_acc: list[float] = field(default_factory=list)
    n_test: int | None = None
    n_val: int | None = None

    @property
    def mean(self) -> float:
        return statistics.fmean(self.test_acc)

    @property
    def std(self) -> float | None:
        """Sample standard deviation over seeds (None with one seed)."""
        return statistics.stdev(self.test_acc) if len(self.test_acc) > 1 else None

    @property
    def se_binomial(self) -> float:
        """Binomial s.e. of one test accuracy at this mean: the split's own noise."""
        return binomial_se(self.mean, max(self.n_test or 1, 1)) or 0.0


@dataclass
class Verdict:
    claim: bool
    rival: VerifyRow | None
    margin: float | None
    binomial_gap_se: float | None
    seed_std: float | None
    sentence: str


def comparison_plans(plan: Plan) -> list[tuple[str, Plan]]:
    """The plan, then its equal-epoch single-method baselines and its no-reference variant."""
    rows: list[tuple[str, Plan]] = [("plan", plan)]
    seen = {plan.content_hash()}
    total = plan.total_epochs
    for stage in plan.stages:
        # The method's parameters as the plan used them (its first stage with that method).
        single = plan.model_copy(update={
            "name": f"{plan.name}-single-{stage.method}",
            "stages": [StageSpec(method=stage.method, epochs=total, params=dict(stage.params))],
            "provenance": None,
        })
        if single.content_hash() not in seen:
            seen.add(single.content_hash())
            rows.append((f"single:{stage.method}", single))
    if len(plan.stages) > 1 and plan.reference.weight_mode != "none":
        ref = plan.reference.model_copy(update={"weight_mode": "none"})
        variant = plan.model_copy(update={"name": f"{plan.name}-no-reference", "reference": ref, "provenance": None})
        if variant.content_hash() not in seen:
            rows.append(("no-reference", variant))
    return rows


def judge(rows: list[VerifyRow]) -> Verdict:
    plan = next(r for r in rows if r.label == "plan")
    singles = [r for r in rows if r.label.startswith("single:")]
    if not singles:
        return Verdict(False, None, None, None, None,
                       "the plan is a single method: there is no other single method to compare with")
    rival = max(singles, key=lambda r: r.mean)
    margin = plan.mean - rival.mean
    se_gap = difference_se(plan.mean, max(plan.n_test or 1, 1), rival.mean, max(rival.n_test or 1, 1))
    stds = [s for s in (plan.std, rival.std) if s is not None]
    seed_std = max(stds) if len(stds) == 2 else None
    head = (f"plan vs best single method ({rival.label}): {100 * margin:+.2f} points; binomial s.e. of the gap "
            f"{100 * se_gap:.2f} points (n_test={plan.n_test}), seed std "
            + (f"{100 * seed_std:.2f} points" if seed_std is not None else "unknown (one seed)"))
    if seed_std is None:
        return Verdict(False, rival, margin, se_gap, None, head + ": one seed gives no seed spread; no claim")
    if margin > 2 * se_gap and margin > seed_std:
        return Verdict(True, rival, margin, se_gap, seed_std,
                       head + ": the margin exceeds 2 s.e. and the seed std: the sequence beats the single method "
                       "on this test split")
    if margin <= 0:
        why = "the plan does not beat the best single method"
    else:
        why = "the margin is inside the noise (needs > 2 s.e. of the gap and > the seed std): no claim"
    return Verdict(False, rival, margin, se_gap, seed_std, f"{head}: {why}")


RunCallback = Callable[[str, int, int, int], None]  # label, seed, index, of how many runs


def run_verify(plan: Plan, *, seeds: int = DEFAULT_SEEDS, device: str | None = None,
               teacher_cache: str | Path = Path("studies") / "teachers",
               on_run: RunCallback | None = None,
               on_result: Callable[[VerifyRow, int, float], None] | None = None) -> tuple[list[VerifyRow], Verdict]:
    """Run every comparison plan on ``seeds`` seeds (plan.seed, plan.seed + 1, ...) and judge.

    Thread count is the caller's business (``torch.set_num_threads``); the data split and the
    teacher are the plan's own and are shared by all runs.
    """
    from smskd_search.data import load_data
    from smskd_search.engine import ensure_teacher, evaluate_test, load_teacher, pick_device, run_plan

    if seeds < 1:
        from smskd_search.errors import UserError

        raise UserError(f"--seeds must be >= 1 (got {seeds})")
    dev = pick_device(device)
    data = load_data(plan.problem.dataset, dev)
    record = ensure_teacher(plan.problem, cache_root=teacher_cache, device=dev, data=data)
    teacher = load_teacher(plan.problem, record, data.info, dev)
    rows = [VerifyRow(label, p) for label, p in comparison_plans(plan)]
    total, i = len(rows) * seeds, 0
    for row in rows:
        for s in range(seeds):
            seed = plan.seed + s
            i += 1
            if on_run is not None:
                on_run(row.label, seed, i, total)
            p = row.plan.model_copy(update={"seed": seed})
            result = run_plan(p, device=dev, data=data, teacher_model=teacher, teacher_record=record)
            test = evaluate_test(p, result)
            row.seeds.append(seed)
            row.test_acc.append(test.acc)
            row.val_acc.append(result.final_val_acc)
            row.n_test, row.n_val = test.n, result.stages[-1].n_val
            if on_result is not None:
                on_result(row, seed, test.acc)
    return rows, judge(rows)


def format_table(rows: list[VerifyRow], verdict: Verdict) -> str:
    cells = []
    for r in rows:
        std = f"{100 * r.std:.2f}" if r.std is not None else "-"
        per = " ".join(f"{100 * a:.2f}" for a in r.test_acc)
        cells.append((r.label, r.plan.sequence(), str(r.plan.total_epochs), f"{100 * r.mean:.2f}", std,
                      f"{100 * r.se_binomial:.2f}", str(r.n_test), per))
    head = ("row", "stages", "epochs", "test mean %", "seed std", "binom s.e.", "n_test", "per seed (%)")
    widths = [max(len(h), *(len(c[i]) for c in cells)) for i, h in enumerate(head)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(head, widths)).rstrip()]
    lines += ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in cells]
    lines.append("")
    lines.append(verdict.sentence)
    return "\n".join(lines)


def to_dict(rows: list[VerifyRow], verdict: Verdict) -> dict:
    return {
        "rows": [{"label": r.label, "sequence": r.plan.sequence(), "total_epochs": r.plan.total_epochs,
                  "seeds": r.seeds, "test_acc": r.test_acc, "val_acc": r.val_acc, "n_test": r.n_test,
                  "n_val": r.n_val, "mean": r.mean, "std": r.std, "se_binomial": r.se_binomial} for r in rows],
        "claim": verdict.claim,
        "rival": verdict.rival.label if verdict.rival else None,
        "margin": verdict.margin,
        "binomial_gap_se": verdict.binomial_gap_se,
        "seed_std": verdict.seed_std,
        "verdict": verdict.sentence,
    }


__all__ = ["DEFAULT_SEEDS", "Verdict", "VerifyRow", "comparison_plans", "format_table", "judge", "run_verify",
           "to_dict"]
