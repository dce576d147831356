"""Seeded, stratified train/validation splits, so every class shows up in validation."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def stratified_split(labels: Sequence, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Return (train_indices, val_indices), sorted, disjoint, covering every index.

    Each class contributes round(val_fraction * its count) items to validation (at least
    one when it has two or more), so a small class such as "mixed" is not left out.
    """
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be between 0 and 1, got {val_fraction}")
    labels = np.asarray(labels)
    rng = np.random.default_rng(seed)
    val = []
    for value in np.unique(labels):
        members = np.flatnonzero(labels == value)
        rng.shuffle(members)
        count = round(val_fraction * len(members))
        if len(members) >= 2:
            count = min(max(count, 1), len(members) - 1)
        else:
            count = 0
        val.extend(members[:count].tolist())
    val_indices = np.sort(np.asarray(val, dtype=np.int64))
    train_indices = np.setdiff1d(np.arange(len(labels)), val_indices)
    return train_indices, val_indices
