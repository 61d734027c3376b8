"""Seeded, stratified splits. The same seed gives the same indices on every machine."""

from __future__ import annotations

import numpy as np
from sklearn.model_selection import train_test_split


def stratified_split(labels: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices (keep, held_out) with ``fraction`` of every class held out, both sorted."""
    idx = np.arange(len(labels))
    keep, held = train_test_split(idx, test_size=fraction, stratify=labels, random_state=seed, shuffle=True)
    return np.sort(keep), np.sort(held)
