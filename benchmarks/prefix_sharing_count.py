"""How many epochs could the stage cache share on a space? Counted from the engine's own keys, no training.

A search on the CIFAR-100 space takes GPU-days; this script asks the cheaper question of how much of
one the stage cache could answer. It draws ``--plans`` plans of the space in order (Optuna's
RandomSampler, seeded; TPE would concentrate on good prefixes and share more), and for each one
looks up, with :func:`stage_prefix_key` and :func:`partial_stage_key`, what the plans before it put:
the longest finished prefix, then the latest partial entry of the next stage at the space's rungs.
Every plan is assumed to run to its end (no pruning) and to put its finished stages and its partial
entries at the rungs, as a search with the cache does. It prints the epochs to train with the cache
against without, under the space's own schedule and under the other kind (cosine <-> step), for the
same plans:

    python benchmarks/prefix_sharing_count.py --space spaces/cifar100-resnet32x4-resnet8x4.yaml --plans 50

The count is an upper bound in one way (a concurrent search trains a shared prefix twice when two
trials want it at once) and a lower bound in another (no pruning, random sampling).
"""

from __future__ import annotations

import argparse

import optuna

from smskd_search.engine.prefix_cache import Runtime, partial_stage_key, stage_prefix_key
from smskd_search.plan import Plan, ScheduleSpec
from smskd_search.search.sampling import suggest_plan
from smskd_search.search.tune_run import rungs_for
from smskd_search.space import load_space

RUNTIME = Runtime(threads=1, device="cuda", precision="bf16")


def count(plans: list[Plan], rungs: list[int]) -> tuple[int, int, int]:
    """(epochs trained with the cache, epochs without, plans that reused something)."""
    have: set[str] = set()
    trained = reusing = 0
    for plan in plans:
        full = [stage_prefix_key(plan, k, teacher_sha256="t", runtime=RUNTIME) for k in range(len(plan.stages))]
        cum = [sum(s.epochs for s in plan.stages[: k + 1]) for k in range(len(plan.stages))]
        done_stages = max((k + 1 for k in range(len(full)) if full[k] in have), default=0)
        reused = cum[done_stages - 1] if done_stages else 0
        if done_stages < len(plan.stages):
            k, before = done_stages, reused
            for c in sorted(rungs, reverse=True):
                if before < c < cum[k] and partial_stage_key(plan, k, c - before, teacher_sha256="t",
                                                             runtime=RUNTIME) in have:
                    reused = c
                    break
        trained += plan.total_epochs - reused
        reusing += reused > 0
        before = 0
        for k, key in enumerate(full):
            have.add(key)
            have.update(partial_stage_key(plan, k, c - before, teacher_sha256="t", runtime=RUNTIME)
                        for c in rungs if before < c < cum[k])
            before = cum[k]
    return trained, sum(p.total_epochs for p in plans), reusing


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--space", default="default")
    ap.add_argument("--plans", type=int, default=50)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    space = load_space(args.space).space
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=args.seed))
    plans = []
    for _ in range(args.plans):
        trial = study.ask()
        plans.append(suggest_plan(trial, space))
        study.tell(trial, 0.0)
    search = space.search
    assert search is not None
    rungs = rungs_for(search, []).milestones if search.pruning.enabled else []
    own = space.recipe.schedule
    other = ScheduleSpec(kind="cosine") if own.kind != "cosine" else ScheduleSpec(kind="step")
    print(f"space {space.name}: {args.plans} random plans (seed {args.seed}), rungs {rungs}, no pruning")
    for label, schedule in ((f"{own.kind} (the space's)", own), (f"{other.kind}", other)):
        recipe = space.recipe.model_copy(update={"schedule": schedule})
        trained, total, reusing = count([p.model_copy(update={"recipe": recipe}) for p in plans], rungs)
        print(f"  {label:<22} epochs trained with the cache {trained:>6} of {total:>6} = {trained / total:.3f}; "
              f"{reusing} plans reuse epochs")


if __name__ == "__main__":
    main()
