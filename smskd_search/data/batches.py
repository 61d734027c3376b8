"""What the engine asks a split for: batches, and a random state to checkpoint.

Two kinds of split answer: :class:`~smskd_search.data.loader.TensorSplit` (decoded, held on the
device; batches by :class:`~smskd_search.data.loader.TensorLoader`) and
:class:`~smskd_search.data.folder_split.StreamingSplit` (files decoded as batches are needed; batches
by :class:`~smskd_search.data.streaming.StreamingLoader`). The engine builds its loaders through
:meth:`Split.loader` and never reads a split's images itself, except through
``resident_images`` (None where the split streams).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, Protocol

import torch

from smskd_search.plan import AugmentSpec


class BatchLoader(Protocol):
    """Iterates over ``(images, labels, indices)`` batches on its device; one pass is one epoch."""

    batch_size: int

    @property
    def device(self) -> torch.device: ...

    @property
    def num_samples(self) -> int: ...

    def __len__(self) -> int: ...

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]: ...

    def random_state(self) -> Any:
        """What a checkpoint keeps so that a resumed run gets the same next batches."""
        ...

    def set_random_state(self, state: Any) -> None: ...


class Split(Protocol):
    """A split of a dataset: its labels (N,) int64 on its device, its size, and loaders over it."""

    labels: torch.Tensor
    streamed: bool

    def __len__(self) -> int: ...

    @property
    def shape(self) -> tuple[int, ...]:
        """(N, C, H, W) of the images its loaders deliver."""
        ...

    @property
    def resident_images(self) -> torch.Tensor | None:
        """All its images on its device, or None (a streamed split)."""
        ...

    def to(self, device: torch.device | str) -> Split: ...

    def loader(self, batch_size: int, *, shuffle: bool = False, augment: AugmentSpec | None = None,
               seed: int | None = None, drop_last: bool = False) -> BatchLoader:
        """Batches: in order and unaugmented for evaluation; shuffled and augmented (``augment``
        enabled), seeded by ``seed``, for training."""
        ...
