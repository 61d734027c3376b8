"""The files of an image folder (``<split>/<class>/<image>``), listed once, in a fixed order.

A streaming dataset holds this list, not the images: ImageNet's 1.28M training images are about
190 GB decoded at 224x224, but their list is a few tens of megabytes.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from smskd_search.errors import UserError

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp"})


@dataclass(frozen=True)
class FolderIndex:
    """The images of one split: paths relative to ``root``, and their labels.

    Args:
        root: The split's folder (e.g. ``<dataset>/train``).
        classes: Class folder names; a label is a position in this tuple.
        files: Image paths relative to ``root``, sorted by class then name.
        labels: ``int64`` label of each file.
    """

    root: Path
    classes: tuple[str, ...]
    files: tuple[str, ...]
    labels: np.ndarray

    def __len__(self) -> int:
        return len(self.files)

    def take(self, positions: np.ndarray) -> FolderIndex:
        """The files at ``positions`` (a split's indices), in that order."""
        return FolderIndex(self.root, self.classes, tuple(self.files[i] for i in positions), self.labels[positions])


def test_folder(base: Path) -> Path | None:
    """The folder of an image folder's test split: ``test/``, else ``val/`` (ImageNet's), else None."""
    for name in ("test", "val"):
        if (base / name).is_dir():
            return base / name
    return None


def class_folders(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.is_dir()) if folder.is_dir() else []


def choose_classes(all_classes: list[str], subset: int | list[str] | None, seed: int) -> list[str]:
    """The classes a dataset keeps: all, a named list, or a seeded draw of ``subset`` of them.

    The draw (ImageNet-100 style) depends only on the sorted class names and the seed, so every
    worker and every later run picks the same classes. The result is sorted: labels follow it.

    Example:
        >>> choose_classes(["a", "b", "c", "d"], ["d", "b"], 0)
        ['b', 'd']
    """
    if subset is None:
        return list(all_classes)
    if isinstance(subset, list):
        unknown = [c for c in subset if c not in all_classes]
        if unknown:
            raise UserError(f"dataset.classes: {unknown[0]!r} is not a class folder (there are {len(all_classes)})")
        return sorted(set(subset))
    if not 2 <= subset <= len(all_classes):
        raise UserError(f"dataset.classes: {subset} classes asked for; the folder has {len(all_classes)} (at least 2)")
    picked = np.random.default_rng(seed).choice(len(all_classes), size=subset, replace=False)
    return sorted(all_classes[i] for i in picked)


def index_folder(folder: Path, classes: list[str], field: str = "dataset.root") -> FolderIndex:
    """List ``folder/<class>/*`` for the given classes (a class without a folder has no images)."""
    files: list[str] = []
    labels: list[int] = []
    for label, cls in enumerate(classes):
        sub = folder / cls
        if not sub.is_dir():
            continue
        names = sorted(p.name for p in sub.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        files.extend(f"{cls}/{n}" for n in names)
        labels.extend([label] * len(names))
    if not files:
        raise UserError(f"{field}: no images under {folder}")
    return FolderIndex(folder, tuple(classes), tuple(files), np.asarray(labels, dtype=np.int64))
