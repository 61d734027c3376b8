"""Cost of SMSKD's reference term: a stage-2 step (method + TCP-weighted reference) against the same
method's step without the reference, on the default digits pair (cnn_large -> cnn_nano), CPU.

Issue 3's benchmark (target: ratio <= 1.10). Everything runs through the engine's own
``train_epoch`` (smskd_search.engine.trainer), with the engine's ``FrozenForward`` for the teacher and
the reference, so what is timed is what a search trial runs. Four variants per method:

- ``no ref``       : CE + method, teacher forward per batch (stage 1 with augmentation on);
- ``ref``          : the same + reference forward per batch + TCP weights + weighted KL (stage 2);
- ``no ref, cache``: teacher outputs computed once for the whole split and gathered by sample index
                     (what the engine does when training batches are not augmented: the default space);
- ``ref, cache``   : teacher and reference outputs both cached (the engine's stage 2 on the default space).

Two measurements, each interleaved (every variant once per round, order flipped every other round):

- step: ``train_epoch`` over a fixed list of full batches (64) of the digits train split, so the time
  per step excludes the epoch's shuffling and the short last batch;
- epoch: ``train_epoch`` over a real shuffled ``TensorLoader`` epoch of the train split.

Each variant has its own copy of the student (same initial weights), method and SGD optimizer. The
cached variants' one-off precomputation is timed apart (it is paid once per stage, not per step).
Runs with ``torch.set_num_threads(1)``, as a search trial does.

    python benchmarks/reference_overhead.py           # full run
    python benchmarks/reference_overhead.py --quick   # a short run
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import Stopwatch, interleave, machine_line, median, paired_ratio, spread, table  # noqa: E402

from smskd_search.data import TensorLoader, load_data  # noqa: E402
from smskd_search.engine.device import pick_precision  # noqa: E402
from smskd_search.engine.frozen import FrozenForward, freeze, frozen_copy  # noqa: E402
from smskd_search.engine.optim import build_optimizer, trainable  # noqa: E402
from smskd_search.engine.trainer import ReferenceTerm, Schedule, train_epoch  # noqa: E402
from smskd_search.methods import MethodContext, build_method  # noqa: E402
from smskd_search.models import create_model, probe_shapes  # noqa: E402
from smskd_search.space import load_space  # noqa: E402

VARIANTS = ("no ref", "ref", "no ref, cache", "ref, cache")


class _SplitView:
    """What train_epoch reads of ``loader.split``: the device (through ``labels``) and a length."""

    def __init__(self, labels: torch.Tensor, n: int):
        self.labels = labels
        self._n = n

    def __len__(self) -> int:
        return self._n


class FixedBatches:
    """A loader of fixed batches (cycled to ``steps``), for per-step timing through train_epoch."""

    def __init__(self, batches: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]], steps: int):
        self.batches = batches
        self.steps = steps
        self.batch_size = batches[0][1].shape[0]
        self.split = _SplitView(batches[0][1], steps * self.batch_size)

    def __len__(self) -> int:
        return self.steps

    def __iter__(self):
        for i in range(self.steps):
            yield self.batches[i % len(self.batches)]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="a short run")
    ap.add_argument("--methods", default="kd,fitnet", help="comma list of methods (any registered)")
    ap.add_argument("--space", default="default", help="space whose pair, data and recipe are used")
    ap.add_argument("--teacher-epochs", type=int, default=0,
                    help="train the teacher this many epochs with the space's teacher recipe first "
                         "(0, the default: random weights; the timing does not depend on them)")
    ap.add_argument("--rounds", type=int, default=None, help="timed rounds (default 11, quick 4)")
    ap.add_argument("--steps", type=int, default=None, help="steps per round of the step measurement (default 40, quick 20)")
    ap.add_argument("--epochs-per-round", type=int, default=None, help="epochs per round of the epoch measurement (default 2, quick 1)")
    ap.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (default 1, as a search trial)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    rounds = args.rounds or (4 if args.quick else 11)
    steps = args.steps or (20 if args.quick else 40)
    epochs_per_round = args.epochs_per_round or (1 if args.quick else 2)

    space = load_space(args.space).space
    problem, recipe, ref_spec = space.problem, space.recipe, space.reference
    device = torch.device("cpu")
    prec = pick_precision(device)
    data = load_data(problem.dataset, device)
    info = data.info
    augmented = recipe.augment.enabled

    torch.manual_seed(0)
    if args.teacher_epochs > 0:
        from smskd_search.engine.teacher import train_teacher_model

        p = problem.model_copy(deep=True)
        p.teacher.recipe.epochs = args.teacher_epochs
        t0 = time.perf_counter()
        teacher = train_teacher_model(p, data, device, prec)
        teacher_note = f"trained {args.teacher_epochs} epochs ({time.perf_counter() - t0:.0f} s)"
    else:
        teacher = create_model(problem.teacher.arch, info.num_classes, info.in_channels, info.image_size)
        teacher_note = "random weights (untrained; timing only)"
    teacher = freeze(teacher.to(device))
    torch.manual_seed(1)
    student0 = create_model(problem.student.arch, info.num_classes, info.in_channels, info.image_size).to(device)
    reference_model = frozen_copy(student0)  # the reference: a frozen student (here its initial weights)
    in_shape = (info.in_channels, info.image_size, info.image_size)
    s_shapes, t_shapes = probe_shapes(student0, in_shape), probe_shapes(teacher, in_shape)

    print("reference_overhead: stage-2 step (method + TCP reference) vs the same method without it")
    print(machine_line(device))
    print(f"space {args.space!r}: {info.name} train split {info.num_train} images, "
          f"{problem.teacher.arch} -> {problem.student.arch}, batch {recipe.batch_size}, "
          f"{recipe.optimizer} lr {recipe.lr}, augmentation {'on' if augmented else 'off'}; teacher {teacher_note}")
    print(f"reference: lambda_ref {ref_spec.lambda_ref}, weight mode {ref_spec.weight_mode}, normalize "
          f"{ref_spec.normalize}, loss {ref_spec.loss}, tau {ref_spec.temperature}; precision fp32; "
          f"torch threads {torch.get_num_threads()}; rounds {rounds}")

    # The cached forwards, built once (their precomputation is per stage); timed for the record.
    t0 = time.perf_counter()
    teacher_cached = FrozenForward(teacher, prec, data.train.images, recipe.eval_batch_size, need_features=True)
    t_teacher_cache = time.perf_counter() - t0
    t0 = time.perf_counter()
    ref_cached = FrozenForward(reference_model, prec, data.train.images, recipe.eval_batch_size,
                               need_features=ref_spec.loss == "feature_mse")
    t_ref_cache = time.perf_counter() - t0
    assert teacher_cached.cached and ref_cached.cached
    teacher_live = FrozenForward(teacher, prec)
    ref_live = FrozenForward(reference_model, prec)

    # Fixed full batches for the per-step measurement.
    gen = torch.Generator(device).manual_seed(0)
    order = torch.randperm(info.num_train, generator=gen)
    bs = recipe.batch_size
    batches = []
    for b in range(info.num_train // bs):
        idx = order[b * bs : (b + 1) * bs]
        batches.append((data.train.images.index_select(0, idx), data.train.labels.index_select(0, idx), idx))

    schedule = Schedule(base_lr=recipe.lr, spec=recipe.schedule, span_epochs=10, epoch_offset=0)
    step_rows, epoch_rows = [], []
    for mname in [m.strip() for m in args.methods.split(",") if m.strip()]:
        params = dict(space.search.method_params.get(mname, {})) if space.search is not None else {}
        torch.manual_seed(2)
        method0 = build_method(mname, params, MethodContext(s_shapes, t_shapes, teacher, info.num_classes,
                                                            info.num_train)).to(device)

        def make(variant: str, loader_factory):
            student = copy.deepcopy(student0)
            method = copy.deepcopy(method0)
            opt = build_optimizer([{"params": trainable(student.parameters())}], recipe, device)
            if trainable(method.parameters()):
                opt.add_param_group({"params": trainable(method.parameters())})
            cached = variant.endswith("cache")
            t_fw = teacher_cached if cached else teacher_live
            reference = None
            if variant.startswith("ref"):
                reference = ReferenceTerm(ref_cached if cached else ref_live, ref_spec)
            loader = loader_factory()
            state = {"epoch": 0}

            def run() -> float:
                with Stopwatch(device) as sw:
                    n_steps = 0
                    for _ in range(epochs_per_round if isinstance(loader, TensorLoader) else 1):
                        train_epoch(student=student, method=method, teacher=t_fw, reference=reference,
                                    loader=loader, optimizer=opt, schedule=schedule,
                                    stage_epoch=state["epoch"] % 10, precision=prec)
                        state["epoch"] += 1
                        n_steps += len(loader)
                return sw.seconds / n_steps

            return run

        # Per-step: fixed batches.
        res = interleave({v: make(v, lambda: FixedBatches(batches, steps)) for v in VARIANTS}, rounds)
        step_rows += _rows(mname, res, "ms/step")
        # Per-epoch: a real shuffled epoch of the engine's loader (one generator per variant, same seed).
        res_e = interleave({v: make(v, lambda: TensorLoader(data.train, bs, shuffle=True, augment=recipe.augment,
                                                            generator=torch.Generator(device).manual_seed(0)))
                            for v in VARIANTS}, rounds)
        epoch_rows += _rows(mname, res_e, "ms/step")
        print(f"  {mname}: done", flush=True)

    n_epoch_steps = -(-info.num_train // bs)
    print()
    print(f"one-off precomputation of the caches (per stage): teacher {t_teacher_cache * 1e3:.1f} ms, "
          f"reference {t_ref_cache * 1e3:.1f} ms, over {info.num_train} images")
    print()
    print(f"Per step (train_epoch over {steps} fixed full batches of {bs}; time per step, median of {rounds} rounds)")
    print(table(HEADERS, step_rows))
    print()
    print(f"Per epoch (train_epoch over shuffled TensorLoader epochs: {n_epoch_steps} steps, the last one short; "
          f"time per step, {epochs_per_round} epoch(s) per round, median of {rounds} rounds)")
    print(table(HEADERS, epoch_rows))
    print()
    print("ratio = variant / the same method's no-reference step with the same teacher path "
          "(ref vs no ref; ref, cache vs no ref, cache); target <= 1.10")
    return 0


HEADERS = ["method", "variant", "ms/step (median)", "rounds min..max", "ratio (medians)", "ratio (paired)",
           "vs no ref uncached"]


def _rows(mname: str, res: dict[str, list[float]], _unit: str) -> list[list[object]]:
    rows = []
    for v in VARIANTS:
        vals = res[v]
        base_name = "no ref, cache" if v.endswith("cache") else "no ref"
        base = res[base_name]
        rows.append([
            mname, v, median(vals) * 1e3, spread([x * 1e3 for x in vals]),
            "-" if v == base_name else f"{median(vals) / median(base):.3f}",
            "-" if v == base_name else f"{paired_ratio(vals, base):.3f}",
            "-" if v == "no ref" else f"{paired_ratio(vals, res['no ref']):.3f}",
        ])
    return rows


if __name__ == "__main__":
    sys.exit(main())
