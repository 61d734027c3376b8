"""Seeded, stratified splits. The same seed gives the same indices on every machine."""

from __future__ import annotations

import numpy as np

from smskd_search.errors import UserError

# scikit-learn is imported where a split is made: it takes seconds to import (scipy.stats with it),
# which every command that loads no data (studies, export, methods, a refused flag) would pay.


def stratified_split(labels: np.ndarray, fraction: float, seed: int,
                     field: str = "dataset.val_fraction") -> tuple[np.ndarray, np.ndarray]:
    """Indices (keep, held_out) with ``fraction`` of every class held out, both sorted.

    Raises:
        UserError: Too few images for that (each class needs one on each side), naming ``field``.
    """
    from sklearn.model_selection import train_test_split

    idx = np.arange(len(labels))
    try:
        keep, held = train_test_split(idx, test_size=fraction, stratify=labels, random_state=seed, shuffle=True)
    except ValueError as exc:  # a tiny dataset: sklearn says why
        raise UserError(f"{field}: {fraction} of {len(labels)} images cannot be split by class: "
                        f"{str(exc).splitlines()[0]}") from None
    return np.sort(keep), np.sort(held)


def stratified_subset(labels: np.ndarray, size: int, seed: int) -> np.ndarray:
    """Sorted indices of ``size`` samples with the class proportions of ``labels``."""
    if size >= len(labels):
        return np.arange(len(labels))
    from sklearn.model_selection import train_test_split

    idx = np.arange(len(labels))
    keep, _ = train_test_split(idx, train_size=size, stratify=labels, random_state=seed, shuffle=True)
    return np.sort(keep)
