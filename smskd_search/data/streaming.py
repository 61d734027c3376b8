"""Batches decoded from image files as they are needed, for folders too large to hold in memory.

The standard ImageNet recipe of the KD codebases (mdistiller, torchdistill, RepDistiller):
RandomResizedCrop(224, scale (0.08, 1), ratio (3/4, 4/3)) + horizontal flip for training, Resize(256)
+ CenterCrop(224) for evaluation. Files are decoded by torchvision.io in DataLoader worker
processes and cross to the device as uint8 (a quarter of float32's bytes); normalisation happens
there.

Reproducibility: an epoch's order comes from ``(seed, epoch)`` and each sample's crop and flip from
``(seed, epoch, index)``, never from a shared random stream, so the same seed gives the same batches
whatever the number of workers or the order in which they finish (the stage cache and the teacher-
logit store rely on it). What cannot hold: JPEG decoding and antialiased resizing are torchvision's
CPU kernels, whose results can differ across torchvision versions or CPU instruction sets.
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch

from smskd_search.data.folder_index import FolderIndex

# ImageNet's channel mean and std of [0, 1] images, as every torchvision classifier is trained with.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class ImageTransform:
    """The ImageNet recipe's sizes and RandomResizedCrop ranges.

    Args:
        size: Side of the square crop the model sees.
        resize: Shorter side before the evaluation's center crop.
        scale: Range of the crop's area, as a fraction of the image's.
        ratio: Range of the crop's aspect ratio (width / height).
    """

    size: int = 224
    resize: int = 256
    scale: tuple[float, float] = (0.08, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)


def draw_seed(*coords: int) -> int:
    """A 63-bit seed for one draw, a function of its (non-negative) coordinates only."""
    return int(np.random.SeedSequence(list(coords)).generate_state(1, np.uint64)[0] >> np.uint64(1))


def order_seed(seed: int, epoch: int) -> int:
    # The middle coordinate keeps orders and samples in domains of their own.
    return draw_seed(seed, epoch, 0)


def sample_seed(seed: int, epoch: int, index: int) -> int:
    return draw_seed(seed, epoch, 1, index)


def crop_box(height: int, width: int, t: ImageTransform, gen: torch.Generator) -> tuple[int, int, int, int]:
    """RandomResizedCrop's box ``(top, left, h, w)``: torchvision's algorithm, drawn from ``gen``.

    torchvision's own ``get_params`` draws from the global random stream; the same ten tries and the
    same fallback (the whole image clamped to the ratio range, centred) are made here from a
    generator of the sample's own.
    """
    area = height * width
    log_ratio = torch.log(torch.tensor(t.ratio))
    for _ in range(10):
        target_area = area * torch.empty(1).uniform_(t.scale[0], t.scale[1], generator=gen).item()
        # torch.exp in float32, as torchvision does: math.exp would round a few crops differently.
        aspect = torch.exp(torch.empty(1).uniform_(float(log_ratio[0]), float(log_ratio[1]), generator=gen)).item()
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = int(torch.randint(0, height - h + 1, (1,), generator=gen).item())
            left = int(torch.randint(0, width - w + 1, (1,), generator=gen).item())
            return top, left, h, w
    in_ratio = width / height
    if in_ratio < min(t.ratio):
        w, h = width, int(round(width / min(t.ratio)))
    elif in_ratio > max(t.ratio):
        h, w = height, int(round(height * max(t.ratio)))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def make_generator(seed: int) -> torch.Generator:
    # Imported here: the engine package imports the data package (the device module is its own).
    from smskd_search.engine.device import make_generator as on_device

    return on_device("cpu", seed)


def read_image(path: str) -> torch.Tensor:
    """A file decoded to a uint8 RGB tensor (3, H, W)."""
    import warnings

    from torchvision.io import ImageReadMode, decode_image, read_file

    # torchvision 0.29 deprecates its decoders in favour of TorchCodec, which the stack does not
    # carry; they still work, and a warning per image would drown a run's output.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        return decode_image(read_file(path), mode=ImageReadMode.RGB)


def train_view(img: torch.Tensor, t: ImageTransform, gen: torch.Generator) -> torch.Tensor:
    from torchvision.transforms.v2 import functional as F

    top, left, h, w = crop_box(img.shape[-2], img.shape[-1], t, gen)
    out = F.resized_crop(img, top, left, h, w, [t.size, t.size], antialias=True)
    if torch.rand(1, generator=gen).item() < 0.5:
        out = F.horizontal_flip(out)
    return out


def eval_view(img: torch.Tensor, t: ImageTransform) -> torch.Tensor:
    from torchvision.transforms.v2 import functional as F

    return F.center_crop(F.resize(img, [t.resize], antialias=True), [t.size, t.size])


class FolderDataset(torch.utils.data.Dataset):
    """Samples of a :class:`FolderIndex`, keyed by ``(index, epoch, seed)``: a sample's augmentation
    is fixed by its key, not by the worker that happens to read it (persistent workers hold a copy
    of this object made when they started, so nothing that changes may live on it)."""

    def __init__(self, index: FolderIndex, transform: ImageTransform, augment: bool):
        self.index = index
        self.transform = transform
        self.augment = augment

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, key: tuple[int, int, int]) -> tuple[torch.Tensor, int, int]:
        i, epoch, seed = key
        img = read_image(str(self.index.root / self.index.files[i]))
        if self.augment:
            gen = make_generator(sample_seed(seed, epoch, i))
            img = train_view(img, self.transform, gen)
        else:
            img = eval_view(img, self.transform)
        return img, int(self.index.labels[i]), i


class _EpochBatches(torch.utils.data.Sampler):
    """Batches of ``(index, epoch, seed)`` keys for the loader's current epoch (read in the main
    process, where DataLoader iterates its sampler)."""

    def __init__(self, loader: StreamingLoader):
        # A weak reference: a strong one would make a cycle (loader -> DataLoader -> sampler ->
        # loader) that only the garbage collector frees, and a DataLoader freed that way waits
        # seconds per worker for workers that never hear the signal to stop.
        self._loader = weakref.ref(loader)

    @property
    def loader(self) -> StreamingLoader:
        loader = self._loader()
        assert loader is not None, "the sampler outlived its loader"
        return loader

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator[list[tuple[int, int, int]]]:
        n, bs, epoch, seed = len(self.loader.dataset), self.loader.batch_size, self.loader.epoch, self.loader.seed
        if self.loader.shuffle:
            order = torch.randperm(n, generator=make_generator(order_seed(seed, epoch)))
        else:
            order = torch.arange(n)
        for b in range(len(self)):
            yield [(int(i), epoch, seed) for i in order[b * bs:(b + 1) * bs]]


class StreamingLoader:
    """Iterates over ``(images, labels, indices)`` batches of an image folder, on ``device``.

    The same contract as :class:`~smskd_search.data.loader.TensorLoader`: images normalised float32
    (B, 3, size, size), labels int64, indices the samples' positions in the split. Each pass is one
    epoch; the epoch counter is the loader's whole random state (``state_dict`` / ``load_state_dict``
    let a resumed run continue the same sequence).

    Args:
        index: The split's files and labels.
        batch_size: Images per batch.
        device: Where batches are delivered.
        shuffle: A new seeded order each epoch (training); otherwise file order.
        augment: RandomResizedCrop + flip (training); otherwise Resize + CenterCrop.
        seed: Fixes every order and every crop, with the epoch.
        num_workers: Decoding processes (0: decode in the caller's process).
        drop_last: Drop a last, smaller batch.
        transform: The recipe's sizes.
        mean: Channel mean of [0, 1] images, for normalisation.
        std: Channel std of [0, 1] images.

    Example:
        >>> loader = StreamingLoader(index, 256, "cuda:0", shuffle=True, augment=True, seed=0, num_workers=8)
        >>> for images, labels, indices in loader:  # doctest: +SKIP
        ...     ...
    """

    def __init__(self, index: FolderIndex, batch_size: int, device: torch.device | str, *, shuffle: bool = False,
                 augment: bool = False, seed: int = 0, num_workers: int = 0, drop_last: bool = False,
                 transform: ImageTransform | None = None, mean: tuple[float, ...] = IMAGENET_MEAN,
                 std: tuple[float, ...] = IMAGENET_STD):
        self.dataset = FolderDataset(index, transform or ImageTransform(), augment)
        self.batch_size, self.shuffle, self.seed, self.drop_last = batch_size, shuffle, seed, drop_last
        self.device = torch.device(device)
        self.epoch = 0
        self.labels = torch.from_numpy(index.labels)
        # The normalisation folded into one multiply-add on the uint8 values, on the device.
        std_t = torch.tensor(std).view(1, -1, 1, 1)
        self._scale = (1.0 / (255.0 * std_t)).to(self.device)
        self._shift = (-torch.tensor(mean).view(1, -1, 1, 1) / std_t).to(self.device)
        self._loader = torch.utils.data.DataLoader(
            self.dataset, batch_sampler=_EpochBatches(self), num_workers=num_workers,
            pin_memory=self.device.type == "cuda", persistent_workers=num_workers > 0,
            prefetch_factor=4 if num_workers > 0 else None,
        )

    def __len__(self) -> int:
        n = len(self.dataset)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    @property
    def num_samples(self) -> int:
        return len(self.dataset)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        try:
            for images, labels, indices in self._loader:
                x = images.to(self.device, non_blocking=True).float().mul_(self._scale).add_(self._shift)
                yield x, labels.to(self.device, non_blocking=True), indices.to(self.device, non_blocking=True)
        finally:
            self.epoch += 1

    def close(self) -> None:
        """Stop the decoding workers now (otherwise they live as long as this loader). Processes
        forked later, other loaders' workers included, then inherit no handle to them."""
        self._loader = None  # type: ignore[assignment]

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "seed": self.seed}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch, self.seed = int(state["epoch"]), int(state["seed"])

    # The names the engine uses for every loader (:class:`~smskd_search.data.batches.BatchLoader`).
    random_state = state_dict
    set_random_state = load_state_dict
