"""The select stage of one request: the request's selector (hired.selectors) on the vision graph's outputs, the
packed order, and the projector's input rows, where a merged (VisionZip contextual) token is the mean of its
group's feature-layer features.

    sel, order = select_stage(layout, cfg, "visionzip", seed, feats, early, late)
    rows = projector_rows(feats, order, sel.groups)      # [kept, Dv]: what projector.onnx receives
"""

from __future__ import annotations

import threading
from collections.abc import Iterator, Mapping
from contextlib import contextmanager, nullcontext
from functools import cache

import numpy as np
from threadpoolctl import ThreadpoolController

from hired import NEWLINE, AnyresLayout, HiredConfig, pack_tokens
from hired.selectors import Selection, apply_selector
from runtime.errors import GenerationError

MATRIX_SELECTORS = ("visionzip",)  # the selectors whose work is a BLAS matrix product (feature similarity)


@cache
def _blas() -> ThreadpoolController:
    """numpy's BLAS libraries (found once, after numpy is loaded)."""
    return ThreadpoolController().select(user_api="blas")


class _OneBlasThread:
    """BLAS on one thread while any request's selection runs: its products are a few million multiply-adds, which
    threads only slow down (they fight onnxruntime's and other jobs' threads for the cores). The thread count is
    process-wide, so the first selection to enter sets the limit (threadpoolctl) and the last to leave restores the
    process's own setting."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._users = 0
        self._limiter = None

    @contextmanager
    def __call__(self) -> Iterator[None]:
        with self._lock:
            if self._users == 0:
                self._limiter = _blas().limit(limits=1)
            self._users += 1
        try:
            yield
        finally:
            with self._lock:
                self._users -= 1
                if self._users == 0:
                    self._limiter.restore_original_limits()


one_blas_thread = _OneBlasThread()


def select_stage(
    layout: AnyresLayout,
    cfg: HiredConfig,
    selector: str,
    seed: int | None,
    feats: np.ndarray,
    early: np.ndarray,
    late: np.ndarray,
) -> tuple[Selection, np.ndarray]:
    """(selection, packed order [span]) of one image from features [n, 576, Dv] and scores [n, 576].

    GenerationError when the vision graph's scores are unusable (not finite, negative: a broken bundle)."""
    try:
        with one_blas_thread() if selector in MATRIX_SELECTORS else nullcontext():
            sel = apply_selector(
                selector, layout, early, late, cfg, features=feats if selector == "visionzip" else None, seed=seed
            )
    except ValueError as e:
        raise GenerationError(f"vision graph gave unusable attention scores ({e}); check the bundle") from None
    return sel, pack_tokens(sel.keep, layout, cfg)


def projector_rows(feats: np.ndarray, order: np.ndarray, groups: Mapping[int, np.ndarray]) -> np.ndarray:
    """[k, Dv] in `feats`' dtype: the features [n, 576, Dv] of the packed order's tokens (NEWLINE slots left
    out); a merged slot (a key of `groups`) gets the float32 mean of its group's features instead."""
    flat = feats.reshape(-1, feats.shape[-1])
    ids = order[order != NEWLINE]
    rows = flat[ids]
    if groups:
        where = np.full(flat.shape[0], -1, dtype=np.int64)
        where[ids] = np.arange(ids.shape[0])
        for slot, members in groups.items():
            rows[where[slot]] = flat[members].astype(np.float32).mean(axis=0)
    return rows
