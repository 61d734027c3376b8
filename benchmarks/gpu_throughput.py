"""GPU throughput of SMSKD stages: our engine against a plain loop written like the KD benchmark
codebases, on one GPU, side by side in one run (issue 7's benchmark).

Measured (CIFAR-100-shaped synthetic data: random uint8 32x32x3 images, 100 classes; the per-image
cost of either pipeline does not depend on the pixels):

1. images/s of one KD stage, resnet32x4 -> resnet8x4:
   - ours: the engine's ``train_epoch`` over a whole device-resident epoch (``TensorLoader``, random
     crop 4 + flip on the GPU), bf16 autocast (fp16 + grad scaling where bf16 is unsupported),
     channels_last, the teacher under no_grad, the engine's fused SGD, metrics read once per epoch;
     at batch 64 (the recipe's, comparable) and 256 / 512 (ours is not loader-bound; the recipe's lr
     is NOT rescaled: throughput only, accuracy at those batch sizes is not measured here);
   - plain: a torchvision ``DataLoader`` over PIL images (RandomCrop(32, 4), RandomHorizontalFlip,
     ToTensor, Normalize), 4 workers (kept alive between epochs: favours plain), batch 64, fp32,
     ``torch.optim.SGD``, ``.cuda()`` per batch, ``loss.item()`` and top-1/top-5 accuracy per step as
     RepDistiller's ``train_distill`` does;
   then the ratio ours / plain;
2. the same for a stage-2 step (KD + the TCP-weighted reference to a frozen copy of the student): the
   overhead ratio stage 2 / stage 1 on the GPU, for ours and for plain;
3. aggregate images/s of N = 1, 2, 4, 8 concurrent trials on one GPU, each a separate engine process
   (as Ray's fractional ``--gpus-per-trial`` would run them), with each process's peak GPU memory
   (``torch.cuda.max_memory_allocated``), to choose the default packing;
4. the projected wall time of the 240-epoch CIFAR-100 recipe (50,000 images per epoch) for one plan;
5. optionally (``--graphs``): the engine's CUDA-graph step (``RunOptions.cuda_graphs``) as contenders
   ``graph s1/s2`` at the first batch size, and the packing again with every trial graphed;
   optionally (``--shared-teacher``): the packing again (graphed with ``--graphs``) with all trials
   on one batch stream and the teacher-logit store's claims
   (:mod:`smskd_search.engine.logit_claims`): each epoch through the teacher once among them, each
   trial computing a share of it, as a search's concurrent trials on one seed get it; the table says
   how many epochs went through the teacher; optionally (``--mps``): the last packing again with every
   trial a client of an NVIDIA MPS daemon started for it (``smskd-search --mps``);
6. optionally (``--compile``): ``torch.compile`` of the student and teacher: compile time against the
   per-epoch gain, and the number of epochs it takes to pay for itself.

On a machine without CUDA it prints "no CUDA device: nothing measured" and exits 0. ``--device cpu
--force`` runs every code path on the CPU with tiny sizes (a dry run, so that the script does not
crash the first time it meets a GPU): bf16 autocast and channels_last are emulated on the CPU there,
and its figures mean nothing. Given real sizes and ``--precision fp32`` it measures the CPU (RESULTS.md
has such a packing run: ``--pack-n-train 1024 --pack-seconds 100 --teacher resnet32x4 --student
resnet8x4``).

    python benchmarks/gpu_throughput.py                      # on a CUDA machine (~5-8 min)
    python benchmarks/gpu_throughput.py --quick              # shorter
    python benchmarks/gpu_throughput.py --compile            # also measure torch.compile
    python benchmarks/gpu_throughput.py --quick --graphs     # also the CUDA-graph step (cuda_graphs)
    python benchmarks/gpu_throughput.py --device cpu --force # dry run of every path, tiny sizes
"""

from __future__ import annotations

import argparse
import copy
import itertools
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import Stopwatch, interleave, machine_line, median, paired_ratio, spread, table  # noqa: E402
from loader_throughput import PILArrayDataset, normalise_chw  # noqa: E402

from smskd_search.data import TensorLoader, TensorSplit  # noqa: E402
from smskd_search.data.__init__ import NORMALIZATION  # noqa: E402
from smskd_search.engine.device import Precision, make_generator, pick_device, pick_precision  # noqa: E402
from smskd_search.engine.frozen import FrozenForward, freeze, frozen_copy  # noqa: E402
from smskd_search.engine.logit_store import EpochTeacher, LogitStore, TeacherPass  # noqa: E402
from smskd_search.engine.optim import build_optimizer, trainable  # noqa: E402
from smskd_search.engine.step_graph import ForwardGraph, StepGraph  # noqa: E402
from smskd_search.engine.tcp import reference_loss, tcp_weights  # noqa: E402
from smskd_search.engine.trainer import ReferenceTerm, Schedule, train_epoch  # noqa: E402
from smskd_search.methods import MethodContext, build_method  # noqa: E402
from smskd_search.models import create_model, probe_shapes  # noqa: E402
from smskd_search.plan import AugmentSpec, RecipeSpec, ReferenceSpec  # noqa: E402

MEAN, STD = NORMALIZATION["cifar100"]
SPACE = "cifar100-resnet32x4-resnet8x4"
EPOCHS_240, IMAGES_PER_EPOCH = 240, 50_000
# The packing tables' columns (run_packing's rows).
PACK_COLUMNS = ["N trials", "aggregate images/s", "per trial min..max", "peak MiB per process (max)", "memory measure",
                "teacher epochs run / trained", "aggregate vs N=1"]


# ----------------------------------------------------------------------------------------- set-up

def synthetic(n: int, num_classes: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return (rng.integers(0, 256, size=(n, 32, 32, 3), dtype=np.uint8),
            rng.integers(0, num_classes, size=n).astype(np.int64))


def base_recipe() -> RecipeSpec:
    try:
        from smskd_search.space import load_space

        return load_space(SPACE).space.recipe
    except Exception:  # the space file is optional here: the benchmark recipe by hand
        return RecipeSpec(lr=0.05, momentum=0.9, weight_decay=5e-4, batch_size=64,
                          augment=AugmentSpec(crop_padding=4, flip=True))


def engine_precision(device: torch.device, mode: str) -> Precision:
    """The engine's choice on CUDA; on the CPU (dry run) bf16 autocast + channels_last, to run the
    same code path as on a GPU."""
    if device.type == "cuda" or mode != "auto":
        return pick_precision(device, mode)
    return Precision(torch.bfloat16, False, True, device.type)


class Models:
    """Teacher (frozen, shared) and a student initialisation, on the device."""

    def __init__(self, teacher: str, student: str, num_classes: int, device: torch.device, prec: Precision):
        torch.manual_seed(0)
        self.teacher_fp32 = freeze(create_model(teacher, num_classes, 3, 32).to(device))
        self.teacher = prec.prepare_model(copy.deepcopy(self.teacher_fp32))
        torch.manual_seed(1)
        self.student0 = create_model(student, num_classes, 3, 32).to(device)
        self.s_shapes = probe_shapes(self.student0, (3, 32, 32))
        self.t_shapes = probe_shapes(self.teacher_fp32, (3, 32, 32))
        self.num_classes = num_classes


class Ours:
    """One engine stage (KD, optionally + the TCP reference) at one batch size: one call = one epoch."""

    def __init__(self, models: Models, split: TensorSplit, batch: int, prec: Precision, device: torch.device,
                 stage2: bool, recipe: RecipeSpec, compile_models: bool = False, graphs: bool = False):
        self.prec, self.device = prec, device
        # The engine's CUDA-graph step (rehearsed, not recorded, in a CPU dry run).
        self.graph = StepGraph(device, rehearse=device.type != "cuda") if graphs else None
        self.student = prec.prepare_model(copy.deepcopy(models.student0))
        ctx = MethodContext(models.s_shapes, models.t_shapes, models.teacher, models.num_classes, len(split))
        self.method = build_method("kd", {}, ctx).to(device)
        self.recipe = recipe.model_copy(update={"batch_size": batch})
        self.opt = build_optimizer([{"params": trainable(self.student.parameters())}], self.recipe, device)
        self.scaler = prec.grad_scaler()
        teacher_model: torch.nn.Module = models.teacher
        student_model: torch.nn.Module = self.student
        if compile_models:
            teacher_model = torch.compile(teacher_model)
            student_model = torch.compile(self.student)
        self.student_model = student_model
        self.teacher = FrozenForward(teacher_model, prec)  # augmented batches: no whole-split cache
        self.reference = None
        if stage2:
            ref = prec.prepare_model(frozen_copy(self.student))
            self.reference = ReferenceTerm(FrozenForward(torch.compile(ref) if compile_models else ref, prec),
                                           ReferenceSpec(lambda_ref=1.0, weight_mode="inverse"))
        self.loader = TensorLoader(split, batch, shuffle=True, augment=self.recipe.augment,
                                   generator=make_generator(device, 0))
        self.schedule = Schedule(self.recipe.lr, self.recipe.schedule, 240, 0)
        self.epoch = 0
        self.teacher_epochs = 0.0  # epochs this process ran the teacher over (fractions: parts of one)
        self.pass_graph: ForwardGraph | None = None

    def run_epoch(self, store: LogitStore | None = None) -> float:
        """Images/s of one epoch over the split; with ``store``, the teacher's logits come through it as a
        search's trials get them (claimed and computed once for the processes on the same stream)."""
        with Stopwatch(self.device) as sw:
            teacher: Any = self.teacher
            if store is not None:
                # As the engine does: with recorded steps, the teacher's pass replays a recorded forward.
                if self.graph is not None and self.pass_graph is None:
                    self.pass_graph = ForwardGraph(self.teacher, self.device, rehearse=self.device.type != "cuda")
                ahead = TeacherPass(self.pass_graph or self.teacher, self.loader, device=self.device)
                try:
                    entry, share = store.shared(f"epoch{self.epoch}", len(self.loader), ahead)
                finally:
                    ahead.close()
                teacher = EpochTeacher(self.teacher, entry, need_features=False, device=self.device)
                self.teacher_epochs += 1.0 if entry is None else share
            else:
                self.teacher_epochs += 1
            train_epoch(student=self.student_model, method=self.method, teacher=teacher, reference=self.reference,
                        loader=self.loader, optimizer=self.opt, schedule=self.schedule,
                        stage_epoch=self.epoch, precision=self.prec, scaler=self.scaler, graph=self.graph)
            if store is not None:
                computed = teacher.finish()  # checks a served epoch against its batches
                if computed is not None:
                    store.put(f"epoch{self.epoch}", computed)
        self.epoch += 1
        return len(self.loader.split) / sw.seconds


def accuracy(output: torch.Tensor, target: torch.Tensor, topk=(1, 5)):
    """RepDistiller's util.accuracy."""
    with torch.no_grad():
        maxk = max(topk)
        batch_size = target.size(0)
        _, pred = output.topk(maxk, 1, True, True)
        pred = pred.t()
        correct = pred.eq(target.view(1, -1).expand_as(pred))
        return [correct[:k].reshape(-1).float().sum(0, keepdim=True).mul_(100.0 / batch_size) for k in topk]


def distill_kl(y_s: torch.Tensor, y_t: torch.Tensor, T: float) -> torch.Tensor:
    """RepDistiller's DistillKL."""
    p_s = F.log_softmax(y_s / T, dim=1)
    p_t = F.softmax(y_t / T, dim=1)
    return F.kl_div(p_s, p_t, reduction="sum") * (T**2) / y_s.shape[0]


class Plain:
    """The benchmark codebases' loop: DataLoader over PIL images, fp32, one ``.item()`` per step."""

    def __init__(self, models: Models, images: np.ndarray, labels: np.ndarray, batch: int, workers: int,
                 steps: int, device: torch.device, stage2: bool):
        from torchvision import transforms

        tf = transforms.Compose([transforms.RandomCrop(32, padding=4), transforms.RandomHorizontalFlip(),
                                 transforms.ToTensor(), transforms.Normalize(MEAN, STD)])
        self.loader = DataLoader(PILArrayDataset(images, labels, tf), batch_size=batch, shuffle=True,
                                 num_workers=workers, persistent_workers=workers > 0)
        self.it = itertools.chain.from_iterable(iter(self.loader) for _ in itertools.count())
        self.steps, self.device = steps, device
        self.model_t = models.teacher_fp32
        self.model_s = copy.deepcopy(models.student0)
        self.model_r = frozen_copy(self.model_s) if stage2 else None
        self.opt = torch.optim.SGD(self.model_s.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)

    def run(self) -> float:
        self.model_s.train()
        n = 0
        losses, top1 = 0.0, 0.0
        with Stopwatch(self.device) as sw:
            for x, y in itertools.islice(self.it, self.steps):
                x, y = x.float().to(self.device), y.to(self.device)
                logit_s, _ = self.model_s(x)
                with torch.no_grad():
                    logit_t, _ = self.model_t(x)
                loss = 0.1 * F.cross_entropy(logit_s, y) + 0.9 * distill_kl(logit_s, logit_t, 4.0)
                if self.model_r is not None:
                    with torch.no_grad():
                        logit_r, _ = self.model_r(x)
                    w = tcp_weights(logit_t, y, "inverse")
                    loss = loss + 1.0 * reference_loss(logit_s, logit_r, w, loss="logit_kl", tau=4.0)
                acc1, _acc5 = accuracy(logit_s, y, topk=(1, 5))
                losses += loss.item() * x.shape[0]
                top1 += float(acc1[0]) * x.shape[0]
                self.opt.zero_grad()
                loss.backward()
                self.opt.step()
                n += x.shape[0]
        return n / sw.seconds


def peak_memory_mib(device: torch.device) -> tuple[float, str]:
    """Peak memory of this process: on CUDA torch's max allocated (and reserved, in the label: what
    the caching allocator holds; the CUDA context, some hundreds of MiB, comes on top of both)."""
    if device.type == "cuda":
        reserved = torch.cuda.max_memory_reserved(device) / 2**20
        return torch.cuda.max_memory_allocated(device) / 2**20, f"GPU max allocated (max reserved {reserved:,.0f} MiB)"
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "host max RSS"


# ------------------------------------------------------------------------------------ packing worker

def worker(args: argparse.Namespace) -> int:
    """One packed trial: wait at the barrier, run engine epochs for --pack-seconds, print JSON."""
    device = pick_device(args.device)
    if device.type == "cpu":
        torch.set_num_threads(1)
    prec = engine_precision(device, args.precision)
    models = Models(args.teacher, args.student, args.num_classes, device, prec)
    # Trials of one study on one seed read the same batch stream; otherwise each its own data.
    images, labels = synthetic(args.pack_n_train, args.num_classes, seed=0 if args.worker_shared else args.worker_index)
    split = TensorSplit(normalise_chw(images, MEAN, STD), torch.from_numpy(labels)).to(device)
    ours = Ours(models, split, args.pack_batch, prec, device, stage2=args.pack_stage2, recipe=base_recipe(),
                graphs=args.worker_graphs)
    ours.run_epoch()  # warm-up (cuDNN autotuning, allocator); its peak memory counts too
    barrier = Path(args.barrier)
    store = LogitStore(barrier / "teacher_logits", memory_max_bytes=0) if args.worker_shared else None
    (barrier / f"ready{args.worker_index}").touch()
    deadline = time.time() + 600
    while not (barrier / "go").exists():
        if time.time() > deadline:
            return 3
        time.sleep(0.01)
    n, t0, before = 0, time.perf_counter(), ours.teacher_epochs
    while time.perf_counter() - t0 < args.pack_seconds:
        ours.run_epoch(store)
        n += len(split)
    elapsed = time.perf_counter() - t0
    mem, mem_kind = peak_memory_mib(device)
    print(json.dumps({"index": args.worker_index, "images": n, "seconds": elapsed, "images_per_s": n / elapsed,
                      "peak_mib": mem, "peak_kind": mem_kind, "epochs": n // len(split),
                      "teacher_epochs": ours.teacher_epochs - before, "waited_s": store.wait_s if store else 0.0}))
    return 0


def run_packing(args: argparse.Namespace, ns: list[int], graphs: bool = False, shared: bool = False,
                extra_env: dict[str, str] | None = None) -> list[list[object]]:
    """Aggregate images/s of N concurrent engine processes; ``shared``: on one batch stream, the teacher's
    logits through one claimed store (one teacher forward an epoch among them, as a search's trials);
    ``extra_env``: the workers' extra environment (an MPS daemon's pipe)."""
    rows = []
    script = os.path.abspath(__file__)
    for n in ns:
        with tempfile.TemporaryDirectory() as barrier:
            cmd_base = [sys.executable, script, "--worker", "--barrier", barrier,
                        *(["--no-cudnn-benchmark"] if args.no_cudnn_benchmark else []), "--device", args.device,
                        "--precision", args.precision, "--teacher", args.teacher, "--student", args.student,
                        "--num-classes", str(args.num_classes), "--pack-n-train", str(args.pack_n_train),
                        "--pack-batch", str(args.pack_batch), "--pack-seconds", str(args.pack_seconds)]
            if args.pack_stage2:
                cmd_base.append("--pack-stage2")
            if graphs:
                cmd_base.append("--worker-graphs")
            if shared:
                cmd_base.append("--worker-shared")
            env = {**os.environ, "PYTHONUNBUFFERED": "1", **(extra_env or {})}
            procs = [subprocess.Popen(cmd_base + ["--worker-index", str(i)], stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True, env=env) for i in range(n)]
            t_start = time.time()
            failed = None
            while len(list(Path(barrier).glob("ready*"))) < n:
                if any(p.poll() not in (None, 0) for p in procs) or time.time() - t_start > 900:
                    failed = "a worker failed or did not get ready"
                    break
                time.sleep(0.05)
            if failed is None:
                (Path(barrier) / "go").touch()
            outs = []
            for p in procs:
                try:
                    out, err = p.communicate(timeout=args.pack_seconds * 4 + 600)
                except subprocess.TimeoutExpired:
                    p.kill()
                    out, err = p.communicate()
                if p.returncode != 0:
                    failed = failed or f"worker exit {p.returncode}: {err.strip().splitlines()[-1:]}"
                for line in out.splitlines():
                    if line.startswith("{"):
                        outs.append(json.loads(line))
            if failed is not None or len(outs) != n:
                rows.append([n, "FAILED", failed or "missing output", "-", "-", "-", "-"])
                continue
            agg = sum(o["images_per_s"] for o in outs)
            per = [o["images_per_s"] for o in outs]
            mem = [o["peak_mib"] for o in outs]
            teacher = f"{sum(o['teacher_epochs'] for o in outs):.1f} / {sum(o['epochs'] for o in outs)}"
            rows.append([n, agg, f"{min(per):,.0f}..{max(per):,.0f}", f"{max(mem):,.0f}", outs[0]["peak_kind"],
                         teacher, "-"])
            label = (" graphed" if graphs else "") + (" one teacher stream" if shared else "") + \
                (" under MPS" if extra_env else "")
            print(f"  packing N={n}{label}: {agg:,.0f} images/s aggregate", flush=True)
    base = rows[0][1] if rows and isinstance(rows[0][1], float) else None
    for r in rows:
        if base and isinstance(r[1], float):
            r[6] = f"{r[1] / base:.2f}x"
    return rows


# --------------------------------------------------------------------------------------------- main

def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="auto", help="auto (cuda when present), cuda, or cpu (with --force)")
    ap.add_argument("--force", action="store_true", help="run without CUDA (a dry run of every code path, tiny sizes)")
    ap.add_argument("--quick", action="store_true", help="fewer rounds and a shorter packing window")
    ap.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16", "fp16"], help="ours' precision")
    ap.add_argument("--teacher", default=None, help="default resnet32x4 (dry run: cnn_small, since bf16 is emulated, slowly, on CPUs)")
    ap.add_argument("--student", default=None, help="default resnet8x4 (dry run: cnn_tiny)")
    ap.add_argument("--num-classes", type=int, default=100)
    ap.add_argument("--n-train", type=int, default=None, help="images per epoch for ours (default 50000)")
    ap.add_argument("--batch-sizes", default=None, help="ours' batch sizes (default 64,256,512)")
    ap.add_argument("--plain-workers", type=int, default=4)
    ap.add_argument("--plain-steps", type=int, default=None, help="plain steps per round (default 300)")
    ap.add_argument("--rounds", type=int, default=None, help="timed rounds (default 3, quick 2)")
    ap.add_argument("--pack", default=None, help="concurrent trials to measure (default 1,2,4,8)")
    ap.add_argument("--pack-batch", type=int, default=64, help="batch of each packed trial (the recipe's)")
    ap.add_argument("--pack-n-train", type=int, default=None, help="images per epoch in a packed trial (default 10000)")
    ap.add_argument("--pack-seconds", type=float, default=None, help="measured window per packing level (default 30)")
    ap.add_argument("--pack-stage2", action="store_true", help="packed trials run stage-2 steps (with the reference)")
    ap.add_argument("--compile", action="store_true", help="also measure torch.compile (student + teacher + reference)")
    ap.add_argument("--graphs", action="store_true",
                    help="also the engine's CUDA-graph step: stage contenders at the first batch size, packing graphed")
    ap.add_argument("--shared-teacher", action="store_true",
                    help="also the packing on one batch stream with the teacher-logit store's claims (one teacher "
                         "forward an epoch for all the trials, as a search's trials on one seed)")
    ap.add_argument("--mps", action="store_true",
                    help="also the last packing under an NVIDIA MPS daemon started for it (where the machine has "
                         "nvidia-cuda-mps-control), as smskd-search --mps runs packed trials")
    ap.add_argument("--no-cudnn-benchmark", action="store_true",
                    help="leave torch.backends.cudnn.benchmark off (default: on for both sides, as RepDistiller sets it)")
    ap.add_argument("--skip", default="", help="comma list of sections to skip: stage, pack, compile")
    # internal: packed worker processes
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--worker-index", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--worker-graphs", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--worker-shared", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--barrier", default="", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    torch.backends.cudnn.benchmark = not args.no_cudnn_benchmark
    if args.worker:
        return worker(args)

    cuda = torch.cuda.is_available()
    if args.device == "auto":
        args.device = "cuda" if cuda else "cpu"
    if args.device.startswith("cuda") and not cuda:
        print("no CUDA device: nothing measured")
        return 0
    if args.device == "cpu" and not args.force:
        print("no CUDA device: nothing measured" if not cuda else
              "--device cpu measures nothing meaningful: add --force for a dry run of the code paths")
        return 0
    device = pick_device(args.device)
    dry = device.type == "cpu"
    args.teacher = args.teacher or ("cnn_small" if dry else "resnet32x4")
    args.student = args.student or ("cnn_tiny" if dry else "resnet8x4")
    if dry:
        torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
        defaults = dict(n_train=128, batch_sizes="16,32", plain_steps=3, rounds=1, pack="1,2",
                        pack_n_train=64, pack_seconds=1.0, plain_batch=16, workers=min(args.plain_workers, 2))
    else:
        defaults = dict(n_train=50_000, batch_sizes="64,256,512", plain_steps=300, rounds=2 if args.quick else 3,
                        pack="1,2,4,8", pack_n_train=10_000, pack_seconds=15.0 if args.quick else 30.0,
                        plain_batch=64, workers=args.plain_workers)
    n_train = args.n_train or defaults["n_train"]
    batch_sizes = [int(b) for b in (args.batch_sizes or defaults["batch_sizes"]).split(",")]
    plain_steps = args.plain_steps or defaults["plain_steps"]
    rounds = args.rounds or defaults["rounds"]
    args.pack_n_train = args.pack_n_train or defaults["pack_n_train"]
    args.pack_seconds = args.pack_seconds or defaults["pack_seconds"]
    pack_ns = [int(x) for x in (args.pack or defaults["pack"]).split(",")]
    plain_batch = defaults["plain_batch"]
    skip = {s.strip() for s in args.skip.split(",") if s.strip()}

    prec = engine_precision(device, args.precision)
    print("gpu_throughput: one SMSKD KD stage, our engine vs the benchmark codebases' plain loop")
    print(machine_line(device))
    if dry:
        print("DRY RUN on the CPU (--force): tiny sizes, bf16 autocast + channels_last emulated; the figures mean nothing")
    print(f"{args.teacher} -> {args.student}, {args.num_classes} classes, synthetic CIFAR-shaped uint8 data; "
          f"ours: {n_train} images/epoch, precision {prec.autocast_dtype or 'fp32'}, channels_last {prec.channels_last}, "
          f"grad scaling {prec.grad_scaling}, batches {batch_sizes}; plain: batch {plain_batch}, "
          f"{defaults['workers']} workers, fp32, {plain_steps} steps/round; rounds {rounds}; "
          f"cudnn.benchmark {torch.backends.cudnn.benchmark} (both sides)")

    images, labels = synthetic(n_train, args.num_classes)
    split = TensorSplit(normalise_chw(images, MEAN, STD), torch.from_numpy(labels)).to(device)
    models = Models(args.teacher, args.student, args.num_classes, device, prec)
    recipe = base_recipe()
    s1_rates: dict[str, float] = {}
    s2_rates: dict[str, float] = {}

    if "stage" not in skip:
        contenders = {}
        for bs in batch_sizes:
            contenders[f"ours s1 b{bs}"] = Ours(models, split, bs, prec, device, False, recipe).run_epoch
            contenders[f"ours s2 b{bs}"] = Ours(models, split, bs, prec, device, True, recipe).run_epoch
        if args.graphs:
            bs = batch_sizes[0]
            contenders[f"graph s1 b{bs}"] = Ours(models, split, bs, prec, device, False, recipe, graphs=True).run_epoch
            contenders[f"graph s2 b{bs}"] = Ours(models, split, bs, prec, device, True, recipe, graphs=True).run_epoch
        contenders[f"plain s1 b{plain_batch}"] = Plain(models, images, labels, plain_batch, defaults["workers"],
                                                       plain_steps, device, False).run
        contenders[f"plain s2 b{plain_batch}"] = Plain(models, images, labels, plain_batch, defaults["workers"],
                                                       plain_steps, device, True).run
        t0 = time.perf_counter()
        res = interleave(contenders, rounds)
        print(f"  stage measurements: {time.perf_counter() - t0:.0f} s", flush=True)
        plain1, plain2 = res[f"plain s1 b{plain_batch}"], res[f"plain s2 b{plain_batch}"]
        rows = []
        for name, vals in res.items():
            stage = "s2" if " s2 " in name else "s1"
            plain = plain2 if stage == "s2" else plain1
            same_s1 = res[name.replace(" s2 ", " s1 ")]
            rows.append([name, median(vals), spread(vals),
                         f"{paired_ratio(vals, plain):.2f}x",
                         "-" if stage == "s1" else f"{paired_ratio(same_s1, vals):.3f}"])
            (s2_rates if stage == "s2" else s1_rates)[name.replace(" s2 ", " ").replace(" s1 ", " ")] = median(vals)
        print()
        print("1-2. One KD stage (s1) and a stage-2 step with the TCP reference (s2): images/s")
        print(table(["contender", "images/s (median)", "rounds min..max", "vs plain, same stage (paired)",
                     "s2 time / s1 time (paired)"], rows))
        print()
        print(f"3'. Projected wall time of the {EPOCHS_240}-epoch CIFAR-100 recipe ({IMAGES_PER_EPOCH:,} images/epoch), "
              "one plan, from the rates above (training steps only; evaluation not included)")
        prow = []
        for key in s1_rates:
            r1, r2 = s1_rates[key], s2_rates.get(key, float("nan"))
            h1 = EPOCHS_240 * IMAGES_PER_EPOCH / r1 / 3600
            h12 = (EPOCHS_240 / 2 * IMAGES_PER_EPOCH / r1 + EPOCHS_240 / 2 * IMAGES_PER_EPOCH / r2) / 3600
            prow.append([key, h1, h12])
        print(table(["contender", "hours, KD only (240 ep. at s1 rate)", "hours, 2 stages (120 s1 + 120 s2)"], prow))

    if "pack" not in skip:
        print()
        print(f"3. Packing: N concurrent engine processes on one {'GPU' if not dry else 'CPU (dry run)'}, each a KD "
              f"stage{' 2' if args.pack_stage2 else ''} at batch {args.pack_batch}, {args.pack_n_train} images/epoch, "
              f"measured {args.pack_seconds:.0f} s after a barrier")
        variants = [(False, False)] + ([(True, False)] if args.graphs else [])
        if args.shared_teacher:  # one more: the last one's step (graphed with --graphs), on one stream
            variants.append((args.graphs, True))
        for graphs, shared in variants:
            rows = run_packing(args, pack_ns, graphs, shared)
            if graphs:
                print("   ... each trial's step a CUDA graph (the engine's cuda_graphs)")
            if shared:
                print("   ... all trials on one batch stream, the teacher's logits through one claimed store "
                      "(a search's trials on one seed)")
            print(table(PACK_COLUMNS, rows))
        if args.mps:
            from smskd_search.search.mps import mps_blocker, start_mps  # (the search package: seconds to import)

            graphs, shared = variants[-1]
            why = mps_blocker(cuda=device.type == "cuda", gpus_per_trial=0.5, address=None, environ=os.environ)
            daemon = start_mps(Path(tempfile.mkdtemp(prefix="smskd-mps-"))) if why is None else why
            if isinstance(daemon, str):
                print(f"   ... under MPS: not measured: {daemon}")
            else:
                try:
                    rows = run_packing(args, pack_ns, graphs, shared, extra_env=daemon.env)
                finally:
                    daemon.stop()
                    shutil.rmtree(daemon.folder, ignore_errors=True)
                print("   ... the last packing again, every trial a client of one MPS daemon (smskd-search --mps)")
                print(table(PACK_COLUMNS, rows))

    if args.compile and "compile" not in skip:
        print()
        bs = batch_sizes[0]
        print(f"5. torch.compile (student, teacher; default mode), KD stage 1 at batch {bs}")
        try:
            eager = Ours(models, split, bs, prec, device, False, recipe)
            comp = Ours(models, split, bs, prec, device, False, recipe, compile_models=True)
            eager.run_epoch()
            with Stopwatch(device) as first:
                comp.run_epoch()  # compiles on its first steps
            res = interleave({"eager": eager.run_epoch, "compiled": comp.run_epoch}, rounds, warmup=0)
            t_eager = len(split) / median(res["eager"])
            t_comp = len(split) / median(res["compiled"])
            overhead = first.seconds - t_comp
            gain = t_eager - t_comp
            rows = [["eager", median(res["eager"]), t_eager, "-", "-"],
                    ["compiled", median(res["compiled"]), t_comp, overhead,
                     f"{overhead / gain:.1f}" if gain > 0 else "never (no gain)"]]
            print(table(["", "images/s (median)", "s/epoch", "compile overhead s (first epoch - steady)",
                         "epochs to break even"], rows))
        except Exception as exc:  # report, do not crash the rest of the benchmark
            print(f"torch.compile failed: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}")
            traceback.print_exc(limit=3)
    return 0


if __name__ == "__main__":
    sys.exit(main())
