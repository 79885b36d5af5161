"""Checks on attention scores: the right shape, finite and non-negative, else a ValueError that says so."""

from __future__ import annotations

import numpy as np


def checked_scores(scores: object, shape: tuple[int, ...], what: str, dtype: type = np.float64) -> np.ndarray:
    """`scores` as a `dtype` array of exactly `shape`; ValueError naming `what` if it is not usable.

    Scores are CLS-row attention sums: real numbers, finite, >= 0.
    """
    array = np.asarray(scores)
    if array.dtype.kind not in "fiu":
        raise ValueError(f"{what} must be real numbers, got dtype {array.dtype}")
    if array.shape != shape:
        raise ValueError(f"{what} must have shape {list(shape)}, got {list(array.shape)}")
    array = array.astype(dtype)
    if not np.isfinite(array).all():
        bad = int(np.flatnonzero(~np.isfinite(array.reshape(-1)))[0])
        raise ValueError(f"{what} must be finite, found {array.reshape(-1)[bad]} at flat index {bad}")
    if (array < 0).any():
        bad = int(np.flatnonzero(array.reshape(-1) < 0)[0])
        raise ValueError(f"{what} must be >= 0, found {array.reshape(-1)[bad]} at flat index {bad}")
    return array
