"""How sharp is a digits problem? Single methods over seeds: mean, seed std and the gap KD - alone.

A default space is only useful if its problem can tell plans apart: the seed noise of a single
method must sit well below the gaps the search is after, and distillation must matter (KD well
above the student alone). This script trains every method of a candidate recipe alone for the same
total epochs over several seeds (student initialisation and batch order; the split stays fixed)
and prints, per method, validation and test accuracy as mean +- seed std, and the paired
difference to the student alone (mean +- s.e. over seeds).

    python benchmarks/default_sharpness.py --student cnn_nano --crop 0 --epochs 10 --seeds 5
    python benchmarks/default_sharpness.py --student cnn_micro --crop 1 --epochs 12 --seeds 5

Candidates are chosen on validation; the test column is the check (nothing here tunes on it).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from _common import machine_line

from smskd_search.data import load_data
from smskd_search.engine import Workbench, ensure_teacher, evaluate_test, load_teacher, run_plan
from smskd_search.plan import AugmentSpec
from smskd_search.space import load_space, make_plan
from smskd_search.stats import mean_se


def _tuned_space(args: argparse.Namespace):
    """The space with the problem, recipe and method parameters the flags change."""
    if args.widths:
        from smskd_search.models.small_cnn import _make

        _make("cnn_try", tuple(int(w) for w in args.widths.split(",")), 1)
        args.student = "cnn_try"
    loaded = load_space(args.space)
    sp = loaded.space
    update = {}
    if args.val_fraction is not None or args.train_subset is not None:
        ds = sp.problem.dataset.model_copy(update={
            k: v for k, v in (("val_fraction", args.val_fraction), ("train_subset", args.train_subset)) if v is not None})
        sp = sp.model_copy(update={"problem": sp.problem.model_copy(update={"dataset": ds})})
    if args.student:
        update["problem"] = sp.problem.model_copy(update={"student": sp.problem.student.model_copy(update={"arch": args.student})})
    recipe = sp.recipe
    if args.crop is not None:
        recipe = recipe.model_copy(update={"augment": AugmentSpec(crop_padding=args.crop, flip=False)})
    if args.lr is not None:
        recipe = recipe.model_copy(update={"lr": args.lr})
    if args.batch_size is not None:
        recipe = recipe.model_copy(update={"batch_size": args.batch_size})
    if args.optimizer is not None:
        recipe = recipe.model_copy(update={"optimizer": args.optimizer})
    if args.weight_decay is not None:
        recipe = recipe.model_copy(update={"weight_decay": args.weight_decay})
    if args.teacher_arch is not None:
        problem = update.get("problem", sp.problem)
        update["problem"] = problem.model_copy(update={"teacher": problem.teacher.model_copy(update={"arch": args.teacher_arch})})
    if args.teacher_crop is not None or args.teacher_epochs is not None:
        t = update.get("problem", sp.problem).teacher
        t_recipe = t.recipe
        if args.teacher_crop is not None:
            t_recipe = t_recipe.model_copy(update={"augment": AugmentSpec(crop_padding=args.teacher_crop, flip=False)})
        if args.teacher_epochs is not None:
            t_recipe = t_recipe.model_copy(update={"epochs": args.teacher_epochs})
        problem = update.get("problem", sp.problem)
        update["problem"] = problem.model_copy(update={"teacher": t.model_copy(update={"recipe": t_recipe})})
    if args.params:
        import json

        merged = {**sp.search.method_params}
        for m, p in json.loads(args.params).items():
            merged[m] = {**merged.get(m, {}), **p}
        update["search"] = sp.search.model_copy(update={"method_params": merged})
    sp = sp.model_copy(update={**update, "recipe": recipe})
    return sp


def _print_summary(rows: dict[str, tuple[list[float], list[float]]], methods: list[str], seeds: int,
                   elapsed: float) -> None:
    """Each method's paired difference to the student alone, and the largest seed spread."""
    if "ce" in rows:
        print("paired difference to the student alone (ce), mean +- s.e. over seeds:")
        for m, (vals, tests) in rows.items():
            if m == "ce":
                continue
            for split, xs, base in (("val", vals, rows["ce"][0]), ("test", tests, rows["ce"][1])):
                mean, se = mean_se([a - b for a, b in zip(xs, base)])
                print(f"  {m:<7} {split:<4} {100 * mean:+6.2f} +- {100 * (se or 0.0):4.2f}", end="")
            print()
    worst_std = max(100 * statistics.stdev(v) for m, (v, _) in rows.items() if m != "ce")
    worst_test = max(100 * statistics.stdev(t) for m, (_, t) in rows.items() if m != "ce")
    print(f"largest seed std among the distillation methods: val {worst_std:.2f}, test {worst_test:.2f} points; "
          f"{len(methods) * seeds} runs in {elapsed:.0f} s ({elapsed / (len(methods) * seeds):.2f} s a run)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--space", default="default", help="the space whose problem and recipe are varied")
    ap.add_argument("--student", default=None, help="student arch (default: the space's)")
    ap.add_argument("--widths", default=None,
                    help="a student to try, as stem,stage1,stage2,stage3 widths of the small CNN (registered as cnn_try)")
    ap.add_argument("--crop", type=int, default=None, help="crop padding in pixels (random shifts; default: the space's)")
    ap.add_argument("--teacher-crop", type=int, default=None,
                    help="crop padding of the teacher's own training (a teacher trained without shifts is wrong on shifted digits)")
    ap.add_argument("--teacher-epochs", type=int, default=None)
    ap.add_argument("--teacher-arch", default=None, help="the teacher's arch (default: the space's)")
    ap.add_argument("--val-fraction", type=float, default=None,
                    help="share of the non-test images held out for validation (the teacher trains on the rest too)")
    ap.add_argument("--train-subset", type=int, default=None, help="a seeded subset of the training images (before the validation split)")
    ap.add_argument("--lr", type=float, default=None)
    ap.add_argument("--batch-size", type=int, default=None)
    ap.add_argument("--optimizer", choices=["sgd", "adamw"], default=None)
    ap.add_argument("--weight-decay", type=float, default=None)
    ap.add_argument("--epochs", type=int, default=10, help="total epochs of every single-method run")
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--methods", default=None, help="comma-separated (default: ce and the space's methods)")
    ap.add_argument("--params", default=None,
                    help='method parameter overrides as JSON, e.g. \'{"fitnet": {"weight": 10}}\' (over the space\'s)')
    ap.add_argument("--teachers", default="studies/teachers")
    args = ap.parse_args()
    torch.set_num_threads(1)
    print(machine_line())

    sp = _tuned_space(args)
    recipe = sp.recipe
    methods = args.methods.split(",") if args.methods else ["ce", *sp.search.methods]

    data = load_data(sp.problem.dataset, torch.device("cpu"))
    record = ensure_teacher(sp.problem, cache_root=args.teachers, data=data)
    teacher = load_teacher(sp.problem, record, data.info, torch.device("cpu"))
    from smskd_search.models import count_parameters, create_model

    n_params = count_parameters(create_model(sp.problem.student.arch, data.info.num_classes, data.info.in_channels,
                                             data.info.image_size))
    print(f"problem: {sp.problem.dataset.name}, teacher {sp.problem.teacher.arch} (val {100 * record.val_acc:.2f}%), "
          f"student {sp.problem.student.arch}{f' {args.widths}' if args.widths else ''} ({n_params} parameters), "
          f"{recipe.optimizer} lr {recipe.lr:g} wd {recipe.weight_decay:g}, batch {recipe.batch_size}, crop {recipe.augment.crop_padding} "
          f"(teacher {sp.problem.teacher.recipe.augment.crop_padding}), "
          f"{args.epochs} epochs, seeds 0..{args.seeds - 1}, n_val {data.info.num_val}")
    rows: dict[str, tuple[list[float], list[float]]] = {}
    bench = Workbench.open(sp.problem, data=data, teacher_record=record, teacher=teacher)
    start = time.perf_counter()
    for m in methods:
        vals, tests = [], []
        for seed in range(args.seeds):
            plan = make_plan(sp, [(m, args.epochs)], seed=seed)
            r = run_plan(plan, bench)
            vals.append(r.final_val_acc)
            tests.append(evaluate_test(plan, r).acc)
        rows[m] = (vals, tests)
        print(f"  {m:<7} val {100 * statistics.mean(vals):6.2f} +- {100 * statistics.stdev(vals):4.2f}   "
              f"test {100 * statistics.mean(tests):6.2f} +- {100 * statistics.stdev(tests):4.2f}", flush=True)
    _print_summary(rows, methods, args.seeds, time.perf_counter() - start)


if __name__ == "__main__":
    main()
