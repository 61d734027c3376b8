"""Image folders as streamed splits: which classes, whether to stream, and the splits themselves.

An ``imagefolder`` dataset is ``<root>/train/<class>/*`` with its test split in ``<root>/test/`` or,
where there is none, ``<root>/val/`` (ImageNet's layout). It streams when ``dataset.stream`` says
so or, unset, when the training folder decoded to float32 at its first image's size (what the
in-memory path holds) would take more than :func:`stream_threshold` bytes. The validation split is
a seeded stratified split of the training folder (its images seen through the evaluation view).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, replace
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch

from smskd_search.data.folder_index import FolderIndex, choose_classes, class_folders, index_folder, test_folder
from smskd_search.data.streaming import IMAGENET_MEAN, IMAGENET_STD, ImageTransform, StreamingLoader
from smskd_search.errors import UserError
from smskd_search.plan import AugmentSpec, DatasetSpec

ENV_STREAM_ABOVE = "SMSKD_STREAM_ABOVE_BYTES"  # the automatic choice's threshold (bytes)
ENV_STREAM_WORKERS = "SMSKD_STREAM_WORKERS"  # decoding processes per loader
DEFAULT_STREAM_ABOVE = 8 << 30
DEFAULT_IMAGE_SIZE = 224


def folder_root(spec: DatasetSpec) -> Path:
    if spec.root is None:
        raise UserError("dataset.root: imagefolder needs a root with train/<class>/ folders (and test/ or val/)")
    base = Path(spec.root)
    if not (base / "train").is_dir():
        raise UserError(f"dataset.root: {base / 'train'} not found (imagefolder needs train/<class>/ folders)")
    return base


def kept_classes(spec: DatasetSpec) -> list[str]:
    """The class folders the dataset keeps (``dataset.classes``), sorted: labels follow this list."""
    return _kept(folder_root(spec), spec.classes, spec.split_seed)


def _kept(root: Path, classes: int | list[str] | None, split_seed: int) -> list[str]:
    every = class_folders(root / "train")
    if not every:
        raise UserError(f"dataset.root: no class folders under {root / 'train'}")
    return choose_classes(every, classes, split_seed)


def class_positions(spec: DatasetSpec) -> list[int] | None:
    """Where the kept classes sit among all the folder's classes (a teacher that classifies all of
    them reads its logits for the kept ones there); None when ``dataset.classes`` keeps them all."""
    if spec.name != "imagefolder" or spec.classes is None:
        return None
    every = class_folders(folder_root(spec) / "train")
    return [every.index(c) for c in kept_classes(spec)]


def stream_threshold() -> int:
    """Bytes above which an imagefolder streams when ``dataset.stream`` is unset: the environment
    variable ``SMSKD_STREAM_ABOVE_BYTES``, else 8 GiB. A fixed number rather than the memory a
    machine has free, so that every node of a search (the variable travels with the trials) makes
    the same choice: the plan's hash does not record an automatic one."""
    raw = os.environ.get(ENV_STREAM_ABOVE)
    if raw is None:
        return DEFAULT_STREAM_ABOVE
    try:
        return int(float(raw))
    except ValueError:
        raise UserError(f"{ENV_STREAM_ABOVE}: a number of bytes, not {raw!r}") from None


def decoded_bytes(index: FolderIndex) -> int:
    """The float32 bytes of the in-memory path's training images: it resizes every image to the
    first one's size (read from its header, nothing decoded)."""
    from PIL import Image

    with Image.open(index.root / index.files[0]) as im:
        width, height = im.size
    return len(index) * 3 * height * width * 4


def _train_index(spec: DatasetSpec) -> FolderIndex:
    classes = spec.classes if not isinstance(spec.classes, list) else tuple(spec.classes)
    return _listed_train(folder_root(spec), classes, spec.split_seed)


@lru_cache(maxsize=4)
def _listed_train(root: Path, classes: int | tuple[str, ...] | None, split_seed: int) -> FolderIndex:
    # Kept: the automatic choice (streams) and the splits it leads to both need the listing, which
    # for ImageNet's 1.28M files takes seconds; a process lists a folder once, as _arrays decodes one.
    kept = _kept(root, list(classes) if isinstance(classes, tuple) else classes, split_seed)
    return index_folder(root / "train", kept)


def streams(spec: DatasetSpec) -> bool:
    """Whether this dataset streams (see the module docstring for the automatic rule)."""
    if spec.name != "imagefolder":
        return False
    if spec.stream is not None:
        return spec.stream
    return decoded_bytes(_train_index(spec)) > stream_threshold()


def data_identity(spec: DatasetSpec) -> dict[str, Any]:
    """What a cache key records of a dataset: :meth:`DatasetSpec.hashed`, with ``stream: true`` where
    ``stream`` is unset and the automatic choice streams.

    Streamed and held splits are different batches (RandomResizedCrop against padded crops), so an
    automatic choice must reach the keys; a held folder's keys stay those stored before the choice
    existed. A folder not present here (a cluster's driver without the data) keeps the spec's own
    identity: the processes that read the data decide where they read it.

    Example:

        >>> from smskd_search.plan import DatasetSpec
        >>> data_identity(DatasetSpec(name="digits"))["name"]
        'digits'
    """
    data = spec.hashed()
    if spec.name == "imagefolder" and spec.stream is None:
        try:
            automatic = streams(spec)
        except UserError:
            return data
        if automatic:
            data["stream"] = True
    return data


def stream_workers() -> int:
    """Decoding processes per streamed loader: ``SMSKD_STREAM_WORKERS``, else the process's torch
    thread count, at most 8."""
    raw = os.environ.get(ENV_STREAM_WORKERS)
    if raw is not None:
        try:
            return max(0, int(raw))
        except ValueError:
            raise UserError(f"{ENV_STREAM_WORKERS}: a number of processes, not {raw!r}") from None
    # The process's torch threads: a trial's share of its node's CPUs (Ray sets them per trial).
    return min(8, torch.get_num_threads())


def transform_for(spec: DatasetSpec) -> ImageTransform:
    size = spec.image_size or DEFAULT_IMAGE_SIZE
    return ImageTransform(size=size, resize=round(size * 256 / 224))


@dataclass
class StreamingSplit:
    """A split of an image folder whose files are decoded as batches are needed.

    Training loaders (``augment`` enabled) take the ImageNet recipe's RandomResizedCrop + flip, at
    ``transform.size`` (the recipe's crop padding is not used); the others Resize + CenterCrop.
    The same seed gives the same batches, whatever the number of decoding workers.

    Args:
        index: Its files and labels.
        transform: The crop and resize sizes.
        device: Where batches are delivered.
        num_workers: Decoding processes per loader.
        mean: Channel mean of [0, 1] images (ImageNet's).
        std: Channel std of [0, 1] images (ImageNet's).
    """

    index: FolderIndex
    transform: ImageTransform
    device: torch.device
    num_workers: int = 0
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD
    # Evaluation loaders by batch size: one set of decoding workers per split, not one per epoch.
    _eval: dict[int, StreamingLoader] = field(default_factory=dict, repr=False, compare=False)

    streamed = True
    resident_images = None

    def __post_init__(self) -> None:
        self.labels = torch.from_numpy(self.index.labels).to(self.device)
        self._eval_pid = os.getpid()

    def __len__(self) -> int:
        return len(self.index)

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_eval": {}}  # live worker processes do not travel

    @property
    def shape(self) -> tuple[int, ...]:
        return (len(self.index), 3, self.transform.size, self.transform.size)

    def to(self, device: torch.device | str) -> StreamingSplit:
        return replace(self, device=torch.device(device), _eval={})

    def loader(self, batch_size: int, *, shuffle: bool = False, augment: AugmentSpec | None = None,
               seed: int | None = None, drop_last: bool = False) -> StreamingLoader:
        """Batches of this split (see :class:`~smskd_search.data.batches.Split`)."""
        augmented = augment is not None and augment.enabled
        if self._eval and self._eval_pid != os.getpid():
            self._eval = {}  # a forked process: its parent's decoding workers are not its own
        if not (shuffle or augmented or drop_last) and batch_size in self._eval:
            return self._eval[batch_size]
        loader = StreamingLoader(self.index, batch_size, self.device, shuffle=shuffle, augment=augmented,
                                 seed=seed if seed is not None else 0, num_workers=self.num_workers,
                                 drop_last=drop_last, transform=self.transform, mean=self.mean, std=self.std)
        if not (shuffle or augmented or drop_last):
            self._eval[batch_size], self._eval_pid = loader, os.getpid()
        return loader


def streaming_train_val(spec: DatasetSpec, device: torch.device | str) -> tuple[StreamingSplit, StreamingSplit, int]:
    """The streamed train and validation splits (and the number of classes)."""
    from smskd_search.data.splits import stratified_split, stratified_subset

    index = _train_index(spec)
    if spec.train_subset is not None:
        if spec.train_subset > len(index):
            raise UserError(f"dataset.train_subset: {spec.train_subset} is more than the {len(index)} training "
                            f"images of {spec.root}")
        index = index.take(stratified_subset(index.labels, spec.train_subset, spec.split_seed))
    train_idx, val_idx = stratified_split(index.labels, spec.val_fraction, spec.split_seed)
    dev, t, workers = torch.device(device), transform_for(spec), stream_workers()
    return (StreamingSplit(index.take(train_idx), t, dev, workers), StreamingSplit(index.take(val_idx), t, dev, workers),
            len(index.classes))


def streaming_test(spec: DatasetSpec, device: torch.device | str) -> StreamingSplit:
    base = folder_root(spec)
    folder = test_folder(base)
    if folder is None:
        raise UserError(f"dataset.root: {base} has neither test/ nor val/ (the imagefolder's test split)")
    index = index_folder(folder, kept_classes(spec))
    return StreamingSplit(index, transform_for(spec), torch.device(device), stream_workers())
