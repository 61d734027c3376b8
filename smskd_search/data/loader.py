"""Device-resident batches with augmentation done on tensors, a whole batch at a time.

Small datasets (digits, Fashion-MNIST, CIFAR) fit in memory, on the GPU where there is one. An
epoch is then a permutation and a few tensor ops per batch instead of a DataLoader over PIL images.
Randomness comes from one ``torch.Generator`` on the data's device, so that a run is reproducible
and no random numbers cross from host to device inside an epoch (a copy from pageable host memory
waits for the device's queue: one hidden synchronisation per batch).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import torch
import torch.nn.functional as F

from smskd_search.plan import AugmentSpec


@dataclass
class TensorSplit:
    """Normalised images (N, C, H, W) float32 and labels (N,) int64, on one device."""

    images: torch.Tensor
    labels: torch.Tensor

    def __len__(self) -> int:
        return self.labels.shape[0]

    def to(self, device: torch.device | str) -> "TensorSplit":
        return TensorSplit(self.images.to(device), self.labels.to(device))


def random_crop(x: torch.Tensor, padding: int, gen: torch.Generator) -> torch.Tensor:
    """Per-sample random crop of the zero-padded batch (zero is the dataset mean after normalising)."""
    b, _, h, w = x.shape
    xp = F.pad(x, (padding, padding, padding, padding))
    oy = torch.randint(0, 2 * padding + 1, (b,), generator=gen, device=gen.device)
    ox = torch.randint(0, 2 * padding + 1, (b,), generator=gen, device=gen.device)
    rows = (oy[:, None] + torch.arange(h, device=x.device))[:, :, None]  # (B, H, 1)
    cols = (ox[:, None] + torch.arange(w, device=x.device))[:, None, :]  # (B, 1, W)
    batch = torch.arange(b, device=x.device)[:, None, None]
    # Advanced indices around a slice put their dims first: (B, H, W, C) -> (B, C, H, W).
    return xp[batch, :, rows, cols].permute(0, 3, 1, 2).contiguous()


def random_flip(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    mask = torch.rand(x.shape[0], generator=gen, device=gen.device) < 0.5
    return torch.where(mask[:, None, None, None], x.flip(3), x)


def augment_batch(x: torch.Tensor, spec: AugmentSpec, gen: torch.Generator) -> torch.Tensor:
    if spec.crop_padding > 0:
        x = random_crop(x, spec.crop_padding, gen)
    if spec.flip:
        x = random_flip(x, gen)
    return x


class TensorLoader:
    """Iterates over (images, labels, indices) batches of a device-resident split.

    ``indices`` are positions in the split (CRD's memory bank needs them). Training loaders shuffle
    and augment with ``generator``; evaluation loaders go in order and never augment.
    """

    def __init__(
        self,
        split: TensorSplit,
        batch_size: int,
        *,
        shuffle: bool = False,
        augment: AugmentSpec | None = None,
        generator: torch.Generator | None = None,
        drop_last: bool = False,
    ):
        self.split = split
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.augment = augment if augment is not None and augment.enabled else None
        device = split.labels.device
        self.generator = generator if generator is not None else torch.Generator(device).manual_seed(0)
        if self.generator.device != device:
            raise ValueError(f"the generator is on {self.generator.device}, the data on {device}")
        self.drop_last = drop_last

    def __len__(self) -> int:
        n = len(self.split)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        n = len(self.split)
        device = self.split.labels.device
        if self.shuffle:
            order = torch.randperm(n, generator=self.generator, device=device)
        else:
            order = torch.arange(n, device=device)
        for b in range(len(self)):
            idx = order[b * self.batch_size : (b + 1) * self.batch_size]
            x = self.split.images.index_select(0, idx)
            if self.augment is not None:
                x = augment_batch(x, self.augment, self.generator)
            yield x, self.split.labels.index_select(0, idx), idx
