"""Images/s of the streaming image-folder loader against torchvision's ``ImageFolder`` +
``DataLoader``, side by side in one run, on a generated JPEG tree of ImageNet-sized images.

Both pipelines do the ImageNet training recipe (RandomResizedCrop 224 + horizontal flip, normalised
float32 batches) with the same number of worker processes and batch size:

- ours: :class:`smskd_search.data.streaming.StreamingLoader` (torchvision.io decode to uint8 tensors,
  tensor crop/resize in the workers, uint8 batches normalised after collation, seeded per sample);
- plain: ``torchvision.datasets.ImageFolder`` (PIL decode) with ``RandomResizedCrop(224)``,
  ``RandomHorizontalFlip()``, ``ToTensor()``, ``Normalize`` and a ``DataLoader`` with persistent
  workers (as mdistiller / torchdistill build theirs);

then the ratio ours / plain. With ``--step cuda`` (or ``cpu``) it also measures, on that device, the
question a GPU user asks: is the loader what the training step waits on? Three figures: our loader
alone delivering to the device, a ResNet-18 training step alone at ``--step-batch`` on batches already
there (the engine's precision, channels_last, fused SGD: the student step of the ImageNet space, the
fastest step it runs), and the two together; the loader must deliver at least the step's rate.

The images are smooth colour fields with noise, at ImageNet's typical sizes (JPEG quality 90,
375x500 and 500x375 and a few others): decoding cost depends on the size and the content, not on what
the image shows. Each pipeline runs one warm-up epoch, then ``--epochs`` timed ones.

    python benchmarks/stream_loader.py                        # 2,000 images, 2 workers
    python benchmarks/stream_loader.py --images 5000 --workers 8 --batch 256
    python benchmarks/stream_loader.py --workers 12 --rounds 1 --step cuda   # on a GPU machine
"""

from __future__ import annotations

import argparse
import gc
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

if TYPE_CHECKING:
    from smskd_search.data.streaming import StreamingLoader


def _write_images(root: Path, first: int, last: int, classes: int, seed: int) -> None:
    from PIL import Image

    sizes = [(375, 500), (500, 375), (333, 500), (500, 333), (480, 640), (256, 341)]
    for i in range(first, last):
        rng = np.random.default_rng([seed, i])
        h, w = sizes[i % len(sizes)]
        yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
        base = np.stack([np.sin(xx / rng.uniform(20, 80) + c) * np.cos(yy / rng.uniform(20, 80)) for c in range(3)], -1)
        arr = np.clip((base * 80 + 128) + rng.normal(0, 12, (h, w, 3)), 0, 255).astype(np.uint8)
        folder = root / f"c{i % classes:03d}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(arr).save(folder / f"{i:06d}.jpg", quality=90)


def write_tree(root: Path, images: int, classes: int, seed: int = 0, processes: int = 1) -> None:
    """``images`` JPEGs in ``classes`` folders under ``root``, each a function of (seed, its number)."""
    if processes <= 1:
        _write_images(root, 0, images, classes, seed)
        return
    from concurrent.futures import ProcessPoolExecutor

    bounds = np.linspace(0, images, processes + 1).astype(int)
    with ProcessPoolExecutor(processes) as pool:
        list(pool.map(_write_images, [root] * processes, bounds[:-1], bounds[1:], [classes] * processes,
                      [seed] * processes))


def rate(loader, epochs: int) -> float:
    for _ in loader:  # warm-up: workers start, files enter the page cache
        pass
    n, t0 = 0, time.perf_counter()
    for _ in range(epochs):
        for batch in loader:
            n += batch[0].shape[0]
    seconds = time.perf_counter() - t0
    if hasattr(loader, "close"):
        loader.close()
    del loader
    gc.collect()  # the workers go now, before the next pipeline forks its own
    return n / seconds


def ours(root: Path, batch: int, workers: int) -> StreamingLoader:
    from smskd_search.data.folder_index import class_folders, index_folder
    from smskd_search.data.streaming import StreamingLoader

    index = index_folder(root, class_folders(root))
    return StreamingLoader(index, batch, "cpu", shuffle=True, augment=True, num_workers=workers)


def plain(root: Path, batch: int, workers: int) -> torch.utils.data.DataLoader:
    from torchvision import datasets, transforms

    tf = transforms.Compose([transforms.RandomResizedCrop(224), transforms.RandomHorizontalFlip(), transforms.ToTensor(),
                             transforms.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))])
    return torch.utils.data.DataLoader(datasets.ImageFolder(str(root), tf), batch_size=batch, shuffle=True,
                                       num_workers=workers, persistent_workers=workers > 0)


def step_rates(root: Path, batch: int, workers: int, device_name: str, steps: int, epochs: int) -> dict[str, float]:
    """Images/s on ``device_name``: our loader alone, a ResNet-18 training step alone, both together."""
    import torch.nn.functional as F

    from smskd_search.data.folder_index import class_folders, index_folder
    from smskd_search.data.streaming import StreamingLoader
    from smskd_search.engine.device import (
        optimizer_impl_kwargs,
        pick_device,
        pick_precision,
        set_numerics,
        synchronize,
    )
    from smskd_search.models import create_model

    device = pick_device(device_name)
    precision = pick_precision(device)
    set_numerics(device, precision)
    index = index_folder(root, class_folders(root))
    model = precision.prepare_model(create_model("resnet18", num_classes=1000).to(device))
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4, **optimizer_impl_kwargs(device))

    def step(x: torch.Tensor, y: torch.Tensor) -> None:
        with precision.autocast():
            logits, _ = model(precision.prepare_input(x))
            loss = F.cross_entropy(logits.float(), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    def loader() -> StreamingLoader:
        return StreamingLoader(index, batch, device, shuffle=True, augment=True, num_workers=workers)

    out = {"loader": rate(loader(), epochs)}
    x = torch.randn(batch, 3, 224, 224, device=device)
    y = torch.randint(0, 1000, (batch,), device=device)
    for _ in range(3):  # warm-up: cuDNN's autotuner, the allocator
        step(x, y)
    synchronize(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        step(x, y)
    synchronize(device)
    out["step"] = steps * batch / (time.perf_counter() - t0)
    feed = loader()
    for _ in feed:  # warm-up epoch, as rate() does
        pass
    n, t0 = 0, time.perf_counter()
    for _ in range(epochs):
        for xb, yb, _ in feed:
            step(xb, yb % 1000)
            n += xb.shape[0]
    synchronize(device)
    out["together"] = n / (time.perf_counter() - t0)
    feed.close()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--images", type=int, default=2000)
    ap.add_argument("--classes", type=int, default=10)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--step", default=None, help="also measure against a ResNet-18 training step on this device")
    ap.add_argument("--step-batch", type=int, default=256)
    ap.add_argument("--step-steps", type=int, default=20, help="timed steps of the step alone")
    ap.add_argument("--skip-plain", action="store_true", help="only our loader (with --step: the step figures)")
    args = ap.parse_args()
    torch.set_num_threads(1)  # the workers do the work; one thread each, as both pipelines get
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "train"
        t0 = time.perf_counter()
        write_tree(root, args.images, args.classes, processes=max(1, args.workers))
        print(f"wrote {args.images} JPEGs in {time.perf_counter() - t0:.0f} s; batch {args.batch}, "
              f"{args.workers} workers, {args.epochs} timed epochs after one warm-up")
        # Alternated, best of each kept: a machine shared with other work slows whichever runs then.
        if not args.skip_plain:
            r_plain = r_ours = 0.0
            for _ in range(args.rounds):
                r_plain = max(r_plain, rate(plain(root, args.batch, args.workers), args.epochs))
                r_ours = max(r_ours, rate(ours(root, args.batch, args.workers), args.epochs))
            print(f"plain (ImageFolder + PIL transforms): {r_plain:8.0f} images/s")
            print(f"ours  (StreamingLoader)             : {r_ours:8.0f} images/s")
            print(f"ratio ours / plain: {r_ours / r_plain:.2f}x (best of {args.rounds} alternated rounds each)")
        if args.step:
            r = step_rates(root, args.step_batch, args.workers, args.step, args.step_steps, args.epochs)
            print(f"on {args.step}, batch {args.step_batch}, {args.workers} workers: loader alone {r['loader']:.0f} "
                  f"images/s, ResNet-18 step alone {r['step']:.0f} images/s, together {r['together']:.0f} images/s")
            verdict = "keeps up with" if r["loader"] >= r["step"] else "is slower than"
            print(f"loader / step: {r['loader'] / r['step']:.2f}x (the loader {verdict} the step); "
                  f"together / step alone: {r['together'] / r['step']:.2f}")


if __name__ == "__main__":
    main()
