"""``verify``: does a plan beat what a user would train instead, on the test split, beyond the noise?

A search ranks plans on a validation split and keeps the best: its winner's margin is biased
upwards. Here the plan and its rivals are re-run at equal total epochs on the same fresh seeds
(student initialisation and batch order; the split stays fixed) and scored on the test split,
which the search never saw:

- the plan itself;
- every single method of its space alone (or, without a space, each method of the plan), for the
  plan's total epochs, with the space's parameters for it;
- the plan with the reference switched off (weight mode ``none``) and with uniform weights
  (``uniform``: the reference without TCP), when the plan has 2+ stages: the paper's ablation.

Each row gets the paired difference plan - row over the seeds (mean +- s.e.) and a verdict: the
plan is better or worse beyond 2 paired s.e., or no difference is shown. A run whose loss went
non-finite marks its row ``diverged``. The claim "the sequence beats every single method" is made
only when the plan is better than each of them beyond 2 paired s.e.

Given a stage-prefix cache (the CLI uses the studies folder's, as a search does), the twins take the
plan's first stage on each seed from it instead of training it again (the plan's runs are queued
first), and a second ``verify`` of a plan trains nothing; the numbers are those of runs from scratch.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from smskd_search.cpus import usable_cpus
from smskd_search.plan import Plan, StageSpec
from smskd_search.stats import binomial_se, mean_se

DEFAULT_SEEDS = 5
# Verification seeds start here (plus the plan's seed): a search trains with the plan's seed and
# confirms from 1000, and the runs that picked a plan are the biased ones.
SEED_OFFSET = 2000


@dataclass
class VerifyRow:
    label: str  # "plan", "single:<method>", "no-reference", "uniform"
    plan: Plan
    seeds: list[int] = field(default_factory=list)
    test_acc: list[float] = field(default_factory=list)
    val_acc: list[float] = field(default_factory=list)
    n_test: int | None = None
    n_val: int | None = None
    diverged: str | None = None  # the first divergence message, if a run of this row diverged
    # Over its seeds: epochs trained, and epochs taken from the stage cache.
    epochs_trained: int = 0
    epochs_reused: int = 0

    @property
    def mean(self) -> float:
        return statistics.fmean(self.test_acc) if self.test_acc else math.nan

    @property
    def std(self) -> float | None:
        """Sample standard deviation over seeds (None with one seed)."""
        return statistics.stdev(self.test_acc) if len(self.test_acc) > 1 else None

    @property
    def se_binomial(self) -> float:
        """Binomial s.e. of one test accuracy at this mean: the split's own noise."""
        return binomial_se(self.mean, max(self.n_test or 1, 1)) or 0.0


@dataclass(frozen=True)
class Paired:
    """Plan minus a row over the seeds both ran: mean, s.e., seeds, and the verdict in a word."""

    mean: float
    se: float | None
    n: int
    verdict: str  # "better", "worse", "no difference shown", "diverged"


@dataclass
class Verdict:
    claim: bool
    rival: VerifyRow | None  # the best single method by test mean
    paired: dict[str, Paired]
    sentence: str


def comparison_plans(plan: Plan, methods: list[str] | None = None,
                     method_params: dict[str, dict[str, Any]] | None = None) -> list[tuple[str, Plan]]:
    """The plan, the equal-epoch single methods (``methods``, default the plan's) and its
    no-reference and uniform-weight twins; a row identical to an earlier one is left out.

    A single method the plan does not use takes ``method_params`` over the pair's defaults, as
    :func:`smskd_search.make_plan` would give it."""
    from smskd_search.methods.pair_defaults import stage_params

    rows: list[tuple[str, Plan]] = [("plan", plan)]
    seen = {plan.canonical_hash()}
    total = plan.total_epochs
    own: dict[str, dict[str, Any]] = {}
    for stage in plan.stages:
        own.setdefault(stage.method, dict(stage.params))  # as the plan used it (its first stage with it)
    for m in methods or list(own):
        params = own[m] if m in own else stage_params(plan.problem.teacher.arch, plan.problem.student.arch, m,
                                                      dict((method_params or {}).get(m, {})))
        single = plan.model_copy(update={"name": f"{plan.name}-single-{m}", "provenance": None,
                                         "stages": [StageSpec(method=m, epochs=total, params=params)]})
        if single.canonical_hash() not in seen:
            seen.add(single.canonical_hash())
            rows.append((f"single:{m}", single))
    if len(plan.stages) > 1:
        for label, mode in (("no-reference", "none"), ("uniform", "uniform")):
            twin = plan.model_copy(update={"name": f"{plan.name}-{label}", "provenance": None,
                                           "reference": plan.reference.model_copy(update={"weight_mode": mode})})
            if twin.canonical_hash() not in seen:
                seen.add(twin.canonical_hash())
                rows.append((label, twin))
    return rows


def paired(plan: VerifyRow, row: VerifyRow) -> Paired:
    if row.diverged or plan.diverged:
        return Paired(math.nan, None, 0, "diverged")
    common = [s for s in plan.seeds if s in row.seeds]
    mean, se = mean_se([plan.test_acc[plan.seeds.index(s)] - row.test_acc[row.seeds.index(s)] for s in common])
    if se is not None and mean > 2 * se and mean > 0:
        verdict = "better"
    elif se is not None and mean < -2 * se and mean < 0:
        verdict = "worse"
    else:
        verdict = "no difference shown"
    return Paired(mean, se, len(common), verdict)


def judge(rows: list[VerifyRow]) -> Verdict:
    plan = next(r for r in rows if r.label == "plan")
    others = {r.label: paired(plan, r) for r in rows if r is not plan}
    singles = [r for r in rows if r.label.startswith("single:") and not r.diverged]
    rival = max(singles, key=lambda r: r.mean, default=None)
    if plan.diverged:
        return Verdict(False, rival, others, f"the plan diverged ({plan.diverged}): no claim")
    if not singles:
        return Verdict(False, None, others, "no single method to compare with (the plan is the only one)")
    if len(plan.seeds) < 2:
        return Verdict(False, rival, others, "one seed gives no paired standard error: no claim")
    single_verdicts = {label: p.verdict for label, p in others.items() if label.startswith("single:")}
    assert rival is not None
    best = others[rival.label]
    head = (f"plan vs best single method ({rival.label}): {100 * best.mean:+.2f} +- {100 * (best.se or 0):.2f} points "
            f"paired over {best.n} seeds")
    if all(v in ("better", "diverged") for v in single_verdicts.values()):
        return Verdict(True, rival, others, head + ": the plan beats every single method beyond 2 paired s.e. "
                       "on this test split")
    worse = sorted(label for label, v in single_verdicts.items() if v == "worse")
    if worse:
        return Verdict(False, rival, others, head + f": the plan is WORSE than {', '.join(worse)} beyond 2 paired s.e.")
    return Verdict(False, rival, others, head + ": not beyond 2 paired s.e. of every single method: no claim")


RunCallback = Callable[[str, int, int, int], None]  # label, seed, index, of how many runs


@dataclass(frozen=True)
class _Outcome:
    """One run's numbers (or its divergence), as a worker process hands them back."""

    test_acc: float = math.nan
    val_acc: float = math.nan
    n_test: int = 0
    n_val: int = 0
    diverged: str | None = None
    epochs_trained: int = 0
    epochs_reused: int = 0


# A worker process's workbench (data split, teacher, stage cache), set up once by _init_worker and
# shared by its runs.
_WORKER: dict[str, Any] = {}


def _init_worker(problem: Any, record: Any, device: str, threads: int, cuda_graphs: bool = False, data: Any = None,
                 in_pool: bool = False, stage_cache: tuple[str, int] | None = None) -> None:
    import torch

    if in_pool:
        import signal

        # A terminal's Ctrl-C reaches the whole process group: the parent stops the pool, and a
        # worker must not take the signal as its current run's failure and go on to the next.
        signal.signal(signal.SIGINT, signal.SIG_IGN)

    from smskd_search.engine import LogitStore, PrefixCache, RunOptions, Workbench

    torch.set_num_threads(threads)
    _WORKER["options"] = RunOptions(cuda_graphs=cuda_graphs)
    stages = logits = None
    if stage_cache is not None:
        stages = PrefixCache(stage_cache[0], stage_cache[1])
        # Beside it, as in a search's studies folder: the plan and its comparisons on one seed read
        # one batch stream, so with augmentation their KD, DKD and CE epochs share the teacher's logits.
        logits = LogitStore(Path(stage_cache[0]).parent / "teacher_logits", stage_cache[1])
    _WORKER["bench"] = Workbench.open(problem, device=device, data=data, teacher_record=record, stage_cache=stages,
                                      logit_store=logits)


def _run_indexed(task: tuple[int, Plan]) -> tuple[int, _Outcome]:
    return task[0], _run_one(task[1])


def _run_one(plan: Plan) -> _Outcome:
    from smskd_search.engine import Diverged, evaluate_test, run_plan

    try:
        result = run_plan(plan, _WORKER["bench"], _WORKER["options"])
    except Diverged as exc:
        return _Outcome(diverged=str(exc))
    test = evaluate_test(plan, result)
    return _Outcome(test.acc, result.final_val_acc, test.n, result.stages[-1].n_val, None, result.epochs_trained,
                    result.epochs_reused)


# Each worker holds its own copy of the data and the teacher: a bound on the memory a default takes.
MAX_DEFAULT_JOBS = 8


def default_jobs(device: str, threads: int, runs: int) -> int:
    """Worker processes for ``verify``: one per ``threads`` of the cores this process may use on a
    CPU (its affinity, as a batch scheduler sets it; at most :data:`MAX_DEFAULT_JOBS`), one on a GPU
    (where the runs already share the device), never more than there are runs."""
    if device != "cpu":
        return 1
    return max(1, min(runs, MAX_DEFAULT_JOBS, usable_cpus() // max(threads, 1)))


def run_verify(plan: Plan, *, seeds: int = DEFAULT_SEEDS, device: str | None = None,
               teacher_cache: str | Path = Path("studies") / "teachers", methods: list[str] | None = None,
               method_params: dict[str, dict[str, Any]] | None = None, on_run: RunCallback | None = None,
               on_result: Callable[[VerifyRow, int, float], None] | None = None,
               jobs: int | None = 1, stage_cache: str | Path | None = None,
               cache_max_bytes: int = 2 * 2**30, cuda_graphs: bool = False) -> tuple[list[VerifyRow], Verdict]:
    """Run every comparison plan on the same ``seeds`` fresh seeds and judge each row.

    Args:
        plan: The plan to verify.
        seeds: Seeds per row (``plan.seed + SEED_OFFSET``, ``+ 1``...).
        device: ``cpu`` or ``cuda`` (default: CUDA where there is one).
        teacher_cache: The teacher cache (the plan's teacher is trained there if missing).
        methods: The single methods to compare with (default: the plan's own).
        method_params: Their parameters (a space's ``method_params``) where the plan has none.
        on_run: Called as each run finishes, with its row's label, its seed, how many runs have
            finished and how many there are.
        on_result: Called with each row, seed and test accuracy, in row and seed order.
        jobs: Worker processes running the runs side by side (``None``: :func:`default_jobs`).
            Each run is the same computation in any process, so the numbers do not depend on it.
        stage_cache: A stage-prefix cache folder (a search's ``<studies>/cache/stages``): stages
            found there are not trained again, and every stage trained is put there; with
            augmentation the teacher's logits go to its sibling ``teacher_logits`` folder
            (:mod:`~smskd_search.engine.logit_store`: the runs on one seed share them); None: neither.
        cache_max_bytes: Its cap (least recently used entries go first).
        cuda_graphs: On a GPU, record each stage's training step as a CUDA graph (``RunOptions``);
            no effect on a CPU.

    Thread count is the caller's business (``torch.set_num_threads``; the workers take the same);
    the data split and the teacher are the plan's own and are shared by all runs.

    Example:
        >>> rows, verdict = run_verify(plan, seeds=3, jobs=2)  # doctest: +SKIP
        >>> print(format_table(rows, verdict))  # doctest: +SKIP
    """
    import torch

    from smskd_search.data import load_data
    from smskd_search.engine import ensure_teacher, pick_device

    if seeds < 1:
        from smskd_search.errors import UserError

        raise UserError(f"--seeds must be >= 1 (got {seeds})")
    dev = pick_device(device)
    data = load_data(plan.problem.dataset, dev)
    record = ensure_teacher(plan.problem, cache_root=teacher_cache, device=dev, data=data)
    rows = [VerifyRow(label, p) for label, p in comparison_plans(plan, methods, method_params)]
    tasks = [(row, row.plan.model_copy(update={"seed": plan.seed + SEED_OFFSET + s})) for row in rows
             for s in range(seeds)]
    threads = torch.get_num_threads()
    n_jobs = default_jobs(str(dev.type), threads, len(tasks)) if jobs is None else max(1, min(jobs, len(tasks)))
    outcomes: list[_Outcome | None] = [None] * len(tasks)

    def finished(i: int, outcome: _Outcome, done: int) -> None:
        outcomes[i] = outcome
        if on_run is not None:
            on_run(tasks[i][0].label, tasks[i][1].seed, done, len(tasks))

    cache = (str(stage_cache), int(cache_max_bytes)) if stage_cache is not None else None
    worker = (plan.problem, record, str(dev), threads, cuda_graphs)
    _run_tasks([p for _, p in tasks], worker, data, cache, n_jobs, finished)
    _collect(tasks, outcomes, on_result)
    return rows, judge(rows)


def _run_tasks(plans: list[Plan], worker: tuple[Any, Any, str, int, bool], data: Any, cache: tuple[str, int] | None,
               n_jobs: int, finished: Callable[[int, _Outcome, int], None]) -> None:
    """Run the plans here (one job, on the caller's data) or in ``n_jobs`` worker processes, each
    set up once (:func:`_init_worker`); ``finished`` hears each outcome by the plan's index."""
    if n_jobs == 1:
        _init_worker(*worker, data, stage_cache=cache)
        try:
            for i, p in enumerate(plans):
                finished(i, _run_one(p), i + 1)
        finally:
            _WORKER.clear()
        return
    import multiprocessing

    # spawn, not fork: a forked child of a process with torch's thread pools can hang.
    pool = multiprocessing.get_context("spawn").Pool(n_jobs, initializer=_init_worker,
                                                     initargs=(*worker, None, True, cache))
    try:
        for done, (i, outcome) in enumerate(pool.imap_unordered(_run_indexed, list(enumerate(plans))), 1):
            finished(i, outcome, done)
        pool.close()
    except BaseException:
        pool.terminate()  # Ctrl-C or a run's error: the runs still queued or running are dropped
        raise
    finally:
        pool.join()


def _collect(tasks: list[tuple[VerifyRow, Plan]], outcomes: list[_Outcome | None],
             on_result: Callable[[VerifyRow, int, float], None] | None) -> None:
    """Each run's outcome into its row (in row and seed order)."""
    for (row, p), outcome in zip(tasks, outcomes):
        assert outcome is not None
        if outcome.diverged is not None:
            row.diverged = row.diverged or outcome.diverged
            continue
        row.seeds.append(p.seed)
        row.test_acc.append(outcome.test_acc)
        row.val_acc.append(outcome.val_acc)
        row.n_test, row.n_val = outcome.n_test, outcome.n_val
        row.epochs_trained += outcome.epochs_trained
        row.epochs_reused += outcome.epochs_reused
        if on_result is not None:
            on_result(row, p.seed, outcome.test_acc)


def format_table(rows: list[VerifyRow], verdict: Verdict) -> str:
    cells = []
    for r in rows:
        std = f"{100 * r.std:.2f}" if r.std is not None else "-"
        per = " ".join(f"{100 * a:.2f}" for a in r.test_acc)
        p = verdict.paired.get(r.label)
        diff = "-" if p is None or p.verdict == "diverged" else (
            f"{100 * p.mean:+.2f}" + (f" ± {100 * p.se:.2f}" if p.se is not None else ""))
        what = "-" if p is None else p.verdict
        mean = "diverged" if r.diverged and not r.test_acc else f"{100 * r.mean:.2f}"
        cells.append((r.label, r.plan.sequence(), str(r.plan.total_epochs), mean, std, str(r.n_test or "-"), diff, what,
                      per))
    head = ("row", "stages", "epochs", "test mean %", "seed std", "n_test", "plan - row (paired)", "verdict",
            "per seed (%)")
    widths = [max(len(h), *(len(c[i]) for c in cells)) for i, h in enumerate(head)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(head, widths)).rstrip()]
    lines += ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in cells]
    for r in rows:
        if r.diverged:
            lines.append(f"{r.label}: {r.diverged}")
    lines.append("")
    lines.append(verdict.sentence)
    return "\n".join(lines)


def to_dict(rows: list[VerifyRow], verdict: Verdict) -> dict:
    def pair(label: str) -> dict | None:
        p = verdict.paired.get(label)
        return None if p is None else {"mean": p.mean, "se": p.se, "n": p.n, "verdict": p.verdict}

    return {
        "rows": [{"label": r.label, "sequence": r.plan.sequence(), "total_epochs": r.plan.total_epochs,
                  "seeds": r.seeds, "test_acc": r.test_acc, "val_acc": r.val_acc, "n_test": r.n_test,
                  "n_val": r.n_val, "mean": r.mean if r.test_acc else None, "std": r.std, "diverged": r.diverged,
                  "epochs_trained": r.epochs_trained, "epochs_reused": r.epochs_reused,
                  "plan_minus_row": pair(r.label)} for r in rows],
        "claim": verdict.claim,
        "rival": verdict.rival.label if verdict.rival else None,
        "verdict": verdict.sentence,
    }


__all__ = ["DEFAULT_SEEDS", "Paired", "SEED_OFFSET", "Verdict", "VerifyRow", "comparison_plans", "default_jobs", "format_table",
           "judge", "paired", "run_verify", "to_dict"]
