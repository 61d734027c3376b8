"""Training images/s: our tensor-resident ``TensorLoader`` against a torchvision ``DataLoader``.

Issue 2's benchmark. Same model, batch size, optimizer and full training steps (forward, backward,
SGD step) on both sides; only the input pipeline differs:

- ours: the split held as a normalised float tensor on the training device, shuffled with one
  generator, random crop (zero padding 4) + horizontal flip done on the whole batch as tensor ops
  (``smskd_search.data.TensorLoader``);
- baseline: what the KD benchmark codebases (RepDistiller, mdistiller) do: a ``Dataset`` holding
  decoded uint8 images (as torchvision's CIFAR10 does) that yields PIL images through
  ``RandomCrop(32, padding=4)``, ``RandomHorizontalFlip``, ``ToTensor``, ``Normalize``, read by a
  ``DataLoader(shuffle=True, num_workers=W)`` (``pin_memory`` and non-blocking copies on CUDA).

Settings: CIFAR-shaped synthetic uint8 data (random 32x32x3 images, 10 classes: the per-image cost of
the PIL path does not depend on the content) with a small CNN (``cnn_small``, so that the loader
rather than the model is measured) and with ``resnet8x4``; and digits (the default space's train
split) with the default student ``cnn_nano``, with the default space's augmentation (none: both
sides then only normalise).

The DataLoader keeps its workers between epochs (``persistent_workers``) and both sides cycle through
epochs; the start-up of a fresh DataLoader iterator (which the codebases pay every epoch) is measured
apart and NOT included in the images/s, which favours the baseline.

    python benchmarks/loader_throughput.py            # full run (CPU, and CUDA when present)
    python benchmarks/loader_throughput.py --quick    # a short run
"""

from __future__ import annotations

import argparse
import copy
import itertools
import os
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import Stopwatch, interleave, machine_line, median, paired_ratio, spread, table  # noqa: E402

from smskd_search.data import TensorLoader, TensorSplit, load_data  # noqa: E402
from smskd_search.data.__init__ import NORMALIZATION  # noqa: E402
from smskd_search.models import MODELS, create_model  # noqa: E402
from smskd_search.plan import AugmentSpec, DatasetSpec  # noqa: E402

CIFAR_MEAN, CIFAR_STD = NORMALIZATION["cifar10"]


class PILArrayDataset(Dataset):
    """Decoded uint8 images (N, H, W[, C]) yielded as PIL images through ``transform`` (torchvision's
    CIFAR10 does exactly this in ``__getitem__``)."""

    def __init__(self, images_hwc: np.ndarray, labels: np.ndarray, transform):
        self.images = images_hwc
        self.labels = labels
        self.transform = transform

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):
        img = Image.fromarray(self.images[i])
        return self.transform(img), int(self.labels[i])


def normalise_chw(images_hwc: np.ndarray, mean, std) -> torch.Tensor:
    t = torch.from_numpy(images_hwc)
    if t.dim() == 3:
        t = t[..., None]
    t = t.permute(0, 3, 1, 2).float().div_(255.0)
    return (t - torch.tensor(mean).view(1, -1, 1, 1)) / torch.tensor(std).view(1, -1, 1, 1)


def cifar_synthetic(n: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, size=(n, 32, 32, 3), dtype=np.uint8)
    labels = rng.integers(0, 10, size=n).astype(np.int64)
    return images, labels, CIFAR_MEAN, CIFAR_STD


def digits_train():
    """The default space's digits train split, as uint8 images for the PIL path."""
    spec = DatasetSpec(name="digits", test_fraction=0.2, val_fraction=0.35, split_seed=0)
    splits = load_data(spec, "cpu")
    mean, std = splits.info.mean, splits.info.std
    x01 = splits.train.images * torch.tensor(std).view(1, -1, 1, 1) + torch.tensor(mean).view(1, -1, 1, 1)
    images = (x01.clamp(0, 1) * 255).round().to(torch.uint8)[:, 0].numpy()  # (N, 8, 8)
    return images, splits.train.labels.numpy(), mean, std


def cycle(make_iter):
    while True:
        yield from make_iter()


def make_step(model: torch.nn.Module, opt: torch.optim.Optimizer):
    def step(x: torch.Tensor, y: torch.Tensor) -> None:
        logits, _ = model(x)
        loss = F.cross_entropy(logits, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step


def sgd(model: torch.nn.Module) -> torch.optim.Optimizer:
    return torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)


def run_setting(name: str, arch: str, data, augment: bool, device: torch.device, batch_size: int,
                workers: list[int], steps: int, rounds: int, startup_reps: int) -> list[list[object]]:
    images, labels, mean, std = data
    channels = 1 if images.ndim == 3 else images.shape[3]
    size = images.shape[1]
    num_classes = int(labels.max()) + 1

    torch.manual_seed(0)
    base_model = create_model(arch, num_classes, channels, size).to(device)

    # Ours: normalised float tensors on the device, tensor augmentation.
    split = TensorSplit(normalise_chw(images, mean, std), torch.from_numpy(labels)).to(device)
    aug = AugmentSpec(crop_padding=4, flip=True) if augment else None
    ours_loader = TensorLoader(split, batch_size, shuffle=True, augment=aug,
                               generator=torch.Generator(device).manual_seed(0))
    ours_model = copy.deepcopy(base_model)
    ours_step = make_step(ours_model, sgd(ours_model))
    ours_iter = cycle(lambda: iter(ours_loader))

    def ours() -> float:
        n = 0
        with Stopwatch(device) as sw:
            for x, y, _ in itertools.islice(ours_iter, steps):
                ours_step(x, y)
                n += y.shape[0]
        return n / sw.seconds

    tf = [transforms.RandomCrop(size, padding=4), transforms.RandomHorizontalFlip()] if augment else []
    tf += [transforms.ToTensor(), transforms.Normalize(mean, std)]
    dataset = PILArrayDataset(images, labels, transforms.Compose(tf))
    cuda = device.type == "cuda"

    contenders = {"ours": ours}
    startup: dict[str, float] = {}
    for w in workers:
        kw = dict(batch_size=batch_size, shuffle=True, num_workers=w, pin_memory=cuda)
        dl = DataLoader(dataset, persistent_workers=w > 0, **kw)
        model = copy.deepcopy(base_model)
        step = make_step(model, sgd(model))
        it = cycle(lambda dl=dl: iter(dl))

        def baseline(it=it, step=step) -> float:
            n = 0
            with Stopwatch(device) as sw:
                for x, y in itertools.islice(it, steps):
                    step(x.to(device, non_blocking=True), y.to(device, non_blocking=True))
                    n += y.shape[0]
            return n / sw.seconds

        contenders[f"DataLoader w={w}"] = baseline
        # Start-up of a fresh iterator (new workers), as the codebases pay it once per epoch.
        times = []
        for _ in range(startup_reps):
            fresh = DataLoader(dataset, **kw)
            t0 = time.perf_counter()
            first = next(iter(fresh))
            times.append(time.perf_counter() - t0)
            del first, fresh
        startup[f"DataLoader w={w}"] = median(times)

    results = interleave(contenders, rounds)
    rows = []
    ref = results["ours"]
    for label, vals in results.items():
        is_ours = label == "ours"
        rows.append([
            name, arch, device.type, label, median(vals), spread(vals),
            "-" if is_ours else f"{median(ref) / median(vals):.2f}x",
            "-" if is_ours else f"{paired_ratio(ref, vals):.2f}x",
            "-" if is_ours else f"{startup[label]:.3f}",
        ])
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="a short run (fewer rounds and steps)")
    ap.add_argument("--devices", default="auto", help="comma list of cpu,cuda; auto: cpu, and cuda when present")
    ap.add_argument("--settings", default="cifar-cnn_small,cifar-resnet8x4,digits-cnn_nano",
                    help="comma list among cifar-cnn_small, cifar-resnet8x4, digits-cnn_nano")
    ap.add_argument("--num-workers", default="2", help="DataLoader workers; a comma list measures several")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--n-cifar", type=int, default=5000, help="synthetic CIFAR-shaped images")
    ap.add_argument("--rounds", type=int, default=None, help="timed rounds per contender (default 7, quick 3)")
    ap.add_argument("--steps", type=int, default=None,
                    help="training steps per round (default: 60 small models / 3 resnet8x4 on CPU, 200 on CUDA; quick: 25 / 2 / 60)")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch.set_num_threads in the main process (default 1, as a search trial; 0: torch default)")
    args = ap.parse_args(argv)

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.devices == "auto":
        devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    else:
        devices = [d.strip() for d in args.devices.split(",") if d.strip()]
    if "cuda" in devices and not torch.cuda.is_available():
        print("no CUDA device: skipping cuda")
        devices = [d for d in devices if d != "cuda"]
    workers = [int(w) for w in args.num_workers.split(",")]
    rounds = args.rounds or (3 if args.quick else 7)
    settings = [s.strip() for s in args.settings.split(",") if s.strip()]

    print("loader_throughput: training images/s, ours (TensorLoader) vs torchvision DataLoader")
    for dev_name in devices:
        print(machine_line(torch.device(dev_name)))
    print(f"batch {args.batch_size}, SGD(lr 0.05, momentum 0.9, wd 5e-4), fp32 both sides, rounds {rounds}, "
          f"DataLoader workers {workers} (persistent; fresh-iterator start-up shown apart, not in images/s)")
    print("digits: the default space's train split, no augmentation (the default recipe's); "
          f"cifar: {args.n_cifar} random uint8 32x32x3 images, RandomCrop(32, 4) + flip on both sides")

    cifar = cifar_synthetic(args.n_cifar)
    digits = digits_train() if any(s.startswith("digits") for s in settings) else None
    all_rows = []
    for dev_name in devices:
        device = torch.device(dev_name)
        for s in settings:
            data_name, arch = s.split("-", 1)
            if arch not in MODELS:
                print(f"skipping {s}: model {arch!r} is not in the zoo (yet)")
                continue
            if args.steps:
                steps = args.steps
            elif device.type == "cuda":
                steps = 60 if args.quick else 200
            elif arch.startswith("resnet"):
                steps = 2 if args.quick else 3
            else:
                steps = 25 if args.quick else 60
            data = cifar if data_name == "cifar" else digits
            t0 = time.perf_counter()
            rows = run_setting(data_name, arch, data, data_name == "cifar", device, args.batch_size, workers,
                               steps, rounds, startup_reps=2 if args.quick else 3)
            print(f"  {s} on {dev_name}: {steps} steps/round, {time.perf_counter() - t0:.0f} s", flush=True)
            all_rows.extend(rows)
    print()
    print(table(["data", "model", "device", "loader", "images/s (median)", "rounds min..max",
                 "ours/this (medians)", "ours/this (paired)", "fresh-iterator start-up s"], all_rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
