"""Decoding an image folder into the in-memory arrays (the first run on an imagefolder dataset; the
result is cached as .npz): the plain loop (one process, a list of arrays stacked, as the engine did
before), ours in one process, and ours in the process's CPUs, side by side; the arrays must be equal.

    python benchmarks/decode_folder.py /tmp/cifar10          # train/ of an image folder (CIFAR-10: 50k JPEGs)
    python benchmarks/decode_folder.py --tiny                # a generated folder of 4,500 small JPEGs
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

from smskd_search.cpus import usable_cpus  # noqa: E402
from smskd_search.data.folder_index import IMAGE_SUFFIXES, class_folders  # noqa: E402
from smskd_search.data.sources import _read_folder  # noqa: E402


def tiny_folder(root: Path, per_class: int = 1500) -> Path:
    from PIL import Image

    rng = np.random.default_rng(0)
    for c in ("a", "b", "c"):
        (root / "train" / c).mkdir(parents=True)
        for i in range(per_class):
            Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(root / "train" / c / f"{i:05d}.jpg")
    return root


def plain(folder: Path, classes: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """The serial loop: open, convert, append, stack."""
    from PIL import Image

    images, labels = [], []
    for label, cls in enumerate(classes):
        for p in sorted(p for p in (folder / cls).iterdir() if p.suffix.lower() in IMAGE_SUFFIXES):
            with Image.open(p) as im:
                images.append(np.asarray(im.convert("RGB"), dtype=np.uint8))
            labels.append(label)
    return np.stack(images).transpose(0, 3, 1, 2).copy(), np.asarray(labels, np.int64)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("root", nargs="?", help="an image folder with train/<class>/")
    ap.add_argument("--tiny", action="store_true", help="generate a small folder instead")
    ap.add_argument("--rounds", type=int, default=2, help="alternated rounds; the best of each is shown")
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        root = tiny_folder(Path(tmp)) if args.tiny or not args.root else Path(args.root)
        folder = root / "train"
        classes = class_folders(folder)
        n = usable_cpus()
        contenders = {"plain loop, 1 process": lambda: plain(folder, classes),
                      "ours, 1 process": lambda: _read_folder(folder, classes, processes=1),
                      f"ours, {n} processes": lambda: _read_folder(folder, classes, processes=n)}
        best: dict[str, float] = {}
        arrays = {}
        for _ in range(args.rounds):
            for name, fn in contenders.items():
                start = time.perf_counter()
                arrays[name] = fn()
                best[name] = min(best.get(name, float("inf")), time.perf_counter() - start)
        x0, y0 = arrays["plain loop, 1 process"]
        same = all(np.array_equal(x, x0) and np.array_equal(y, y0) for x, y in arrays.values())
        print(f"{folder}: {len(y0)} images {tuple(x0.shape[1:])}, best of {args.rounds} alternated rounds")
        print("| decoding | seconds | images/s | vs plain |")
        print("|---|---|---|---|")
        base = best["plain loop, 1 process"]
        for name, sec in best.items():
            print(f"| {name} | {sec:.2f} | {len(y0) / sec:,.0f} | {base / sec:.2f}x |")
        print(f"arrays identical: {same}")
        return 0 if same else 1


if __name__ == "__main__":
    raise SystemExit(main())
