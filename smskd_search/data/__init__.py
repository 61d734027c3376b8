"""Datasets by name, offline (but for CIFAR with ``download: true``), as seeded train / val / test splits:
held as tensors, or, for image folders too large to hold (``dataset.stream``), streamed from their files
(:mod:`smskd_search.data.folder_split`). Both kinds answer the engine alike (:mod:`smskd_search.data.batches`).

``load_data(spec)`` gives the train and validation splits: validation is always a seeded stratified
split of the training data. The test split is only reachable through :func:`load_test_split`, an
explicit evaluation call that training and search code never make. Setting the environment variable
``SMSKD_TEST_ACCESS_LOG`` to a file path makes every test-split access append a line there (tests use
it to prove that a search never touched the test set).
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch

from smskd_search.data import sources
from smskd_search.data.batches import BatchLoader, Split
from smskd_search.data.download import ENV_VARS as DOWNLOAD_ENV_VARS
from smskd_search.data.folder_index import class_folders
from smskd_search.data.folder_split import (
    ENV_STREAM_ABOVE,
    ENV_STREAM_WORKERS,
    StreamingSplit,
    folder_root,
    kept_classes,
    streaming_test,
    streaming_train_val,
    streams,
)
from smskd_search.data.loader import TensorLoader, TensorSplit, augment_batch
from smskd_search.data.splits import stratified_split, stratified_subset
from smskd_search.data.streaming import IMAGENET_MEAN, IMAGENET_STD
from smskd_search.errors import UserError
from smskd_search.plan import DatasetSpec

ENV_TEST_ACCESS_LOG = "SMSKD_TEST_ACCESS_LOG"
# Every environment variable the data layer reads: a search propagates exactly these to its trials.
# Those that hold a path (a search makes them absolute), then the download mirror's URL and md5.
PATH_ENV_VARS = (sources.ENV_DATA, sources.ENV_CACHE, ENV_TEST_ACCESS_LOG)
ENV_VARS = (*PATH_ENV_VARS, *DOWNLOAD_ENV_VARS, ENV_STREAM_ABOVE, ENV_STREAM_WORKERS)

# Per-dataset normalisation (channel mean, std) of the [0, 1] images. imagefolder computes its own.
NORMALIZATION = {
    "digits": ((0.3050,), (0.3886,)),
    "fashion_mnist": ((0.2860,), (0.3530,)),
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4867, 0.4408), (0.2675, 0.2565, 0.2761)),
}


@dataclass
class DataInfo:
    name: str
    num_classes: int
    in_channels: int
    image_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    num_train: int
    num_val: int
    # Whether the splits stream from files (image_size is then the crop's) or are held as tensors.
    streamed: bool = False


@dataclass
class DataSplits:
    info: DataInfo
    train: Split
    val: Split

    def to(self, device: torch.device | str) -> DataSplits:
        return DataSplits(self.info, self.train.to(device), self.val.to(device))


@lru_cache(maxsize=4)
def _arrays(name: str, root: str | None, download: bool = False) -> sources.Arrays:
    if name == "digits":
        return sources.load_digits_arrays()
    if name == "fashion_mnist":
        return sources.load_fashion_mnist_arrays(root)
    if name in ("cifar10", "cifar100"):
        return sources.load_cifar_arrays(name, root, download)
    if name == "imagefolder":
        return sources.load_imagefolder_arrays(root)
    raise ValueError(f"unknown dataset {name!r}")


def _keep_classes(spec: DatasetSpec, arrays: sources.Arrays) -> sources.Arrays:
    """The images of the classes ``dataset.classes`` keeps, relabelled by their place among them."""
    x, y, xt, yt = arrays
    every = class_folders(folder_root(spec) / "train")
    kept = kept_classes(spec)
    if len(kept) == len(every):
        return arrays
    relabel = np.full(len(every), -1, np.int64)
    relabel[[every.index(c) for c in kept]] = np.arange(len(kept))
    keep = relabel[y] >= 0
    x, y = x[keep], relabel[y[keep]]
    if xt is not None and yt is not None:
        keep_t = relabel[yt] >= 0
        xt, yt = xt[keep_t], relabel[yt[keep_t]]
    return x, y, xt, yt


def _train_test(spec: DatasetSpec) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    arrays = _arrays(spec.name, spec.root, spec.download)
    x, y, xt, yt = _keep_classes(spec, arrays) if spec.classes is not None else arrays
    if xt is None:
        # No official test split (digits): a seeded stratified one, held out before anything else.
        keep, held = stratified_split(y, spec.test_fraction, spec.split_seed, "dataset.test_fraction")
        x, y, xt, yt = x[keep], y[keep], x[held], y[held]
    if spec.train_subset is not None:
        if spec.train_subset > len(y):
            raise UserError(f"dataset.train_subset: {spec.train_subset} is more than the {len(y)} training images of {spec.name}")
        sub = stratified_subset(y, spec.train_subset, spec.split_seed)
        x, y = x[sub], y[sub]
    return x, y, xt, yt


def _normalise(x: np.ndarray, mean: tuple[float, ...], std: tuple[float, ...]) -> torch.Tensor:
    t = torch.from_numpy(np.require(x, requirements=["C", "W"]))
    t = t.float().div_(255.0) if t.dtype == torch.uint8 else t.float()
    m = torch.tensor(mean).view(1, -1, 1, 1)
    s = torch.tensor(std).view(1, -1, 1, 1)
    return (t - m) / s


def _stats(spec: DatasetSpec, x_train: np.ndarray) -> tuple[tuple[float, ...], tuple[float, ...]]:
    if spec.name in NORMALIZATION:
        return NORMALIZATION[spec.name]
    t = torch.from_numpy(x_train[: min(len(x_train), 10000)]).float()
    if x_train.dtype == np.uint8:
        t = t / 255.0
    return tuple(t.mean((0, 2, 3)).tolist()), tuple(t.std((0, 2, 3)).clamp_min(1e-3).tolist())


def load_data(spec: DatasetSpec, device: torch.device | str = "cpu") -> DataSplits:
    """Train and validation splits (validation carved from the training data, seeded, stratified):
    streamed where :func:`~smskd_search.data.folder_split.streams` says so, else held as tensors."""
    if streams(spec):
        return _load_streaming(spec, device)
    x, y, _, _ = _train_test(spec)
    train_idx, val_idx = stratified_split(y, spec.val_fraction, spec.split_seed)
    mean, std = _stats(spec, x[train_idx])
    info = DataInfo(
        name=spec.name,
        num_classes=int(y.max()) + 1,
        in_channels=x.shape[1],
        image_size=x.shape[2],
        mean=mean,
        std=std,
        num_train=len(train_idx),
        num_val=len(val_idx),
    )
    train = TensorSplit(_normalise(x[train_idx], mean, std), torch.from_numpy(y[train_idx]))
    val = TensorSplit(_normalise(x[val_idx], mean, std), torch.from_numpy(y[val_idx]))
    return DataSplits(info, train, val).to(device)


def _load_streaming(spec: DatasetSpec, device: torch.device | str) -> DataSplits:
    train, val, num_classes = streaming_train_val(spec, device)
    info = DataInfo(name=spec.name, num_classes=num_classes, in_channels=3, image_size=train.transform.size,
                    mean=IMAGENET_MEAN, std=IMAGENET_STD, num_train=len(train), num_val=len(val), streamed=True)
    return DataSplits(info, train, val)


def load_test_split(spec: DatasetSpec, info: DataInfo, device: torch.device | str = "cpu") -> Split:
    """The test split: for final evaluation of a trained model only, never for training or tuning.
    Streamed where the training split streams (``info.streamed``)."""
    log = os.environ.get(ENV_TEST_ACCESS_LOG)
    if log:
        with open(log, "a") as f:
            f.write(f"{time.time():.3f} pid={os.getpid()} dataset={spec.name}\n")
    if info.streamed:
        return streaming_test(spec, device)
    _, _, xt, yt = _train_test(spec)
    return TensorSplit(_normalise(xt, info.mean, info.std), torch.from_numpy(np.require(yt, requirements=["W"]))).to(device)


__all__ = [
    "ENV_VARS",
    "PATH_ENV_VARS",
    "BatchLoader",
    "DataInfo",
    "DataSplits",
    "Split",
    "StreamingSplit",
    "TensorLoader",
    "TensorSplit",
    "augment_batch",
    "load_data",
    "load_test_split",
    "stratified_split",
]
