"""Attention scores: checks (the right shape, finite, non-negative, else a ValueError that says so) and top-k."""

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


def top_k(scores: np.ndarray, k: int, candidates: np.ndarray | None = None) -> np.ndarray:
    """int64 [k]: indices of the k highest `scores` [m] among `candidates` (default all), sorted ascending.

    Ties go to the lower index (a stable sort on -score).
    """
    if candidates is None:
        candidates = np.arange(scores.shape[0])
    if not 0 <= k <= candidates.shape[0]:
        raise ValueError(f"cannot keep {k} tokens out of {candidates.shape[0]} candidates")
    order = np.argsort(-scores[candidates], kind="stable")[:k]
    return np.sort(candidates[order]).astype(np.int64)
