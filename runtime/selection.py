"""The select stage of one request: the request's selector (hired.selectors) on the vision graph's outputs, the
packed order, and the projector's input rows, where a merged (VisionZip contextual) token is the mean of its
group's feature-layer features.

    sel, order = select_stage(layout, cfg, "visionzip", seed, feats, early, late)   # nearest=: a NearestTarget
    rows = projector_rows(feats, order, sel.groups)      # [kept, Dv]: what projector.onnx receives
"""

from __future__ import annotations

from collections.abc import Mapping
from functools import cache

import numpy as np

from hired import NEWLINE, AnyresLayout, HiredConfig, pack_tokens
from hired.selectors import MergedGroups, Nearest, Selection, apply_selector
from runtime.errors import GenerationError
from runtime.similarity import NearestTarget


@cache
def default_nearest() -> NearestTarget:
    """The process's shared similarity search for callers without a Pipeline (bench.overhead, tests)."""
    return NearestTarget()


def select_stage(
    layout: AnyresLayout,
    cfg: HiredConfig,
    selector: str,
    seed: int | None,
    feats: np.ndarray,
    early: np.ndarray,
    late: np.ndarray,
    nearest: Nearest | None = None,
) -> tuple[Selection, np.ndarray]:
    """(selection, packed order [span]) of one image from features [n, 576, Dv] and scores [n, 576]. nearest:
    visionzip's similarity search (the Pipeline's NearestTarget; None: default_nearest()).

    GenerationError when the vision graph's scores are unusable (not finite, negative: a broken bundle)."""
    try:
        sel = apply_selector(
            selector, layout, early, late, cfg, features=feats if selector == "visionzip" else None, seed=seed,
            nearest=nearest or default_nearest(),
        )  # fmt: skip
    except ValueError as e:
        raise GenerationError(f"vision graph gave unusable attention scores ({e}); check the bundle") from None
    return sel, pack_tokens(sel.keep, layout, cfg)


def projector_rows(feats: np.ndarray, order: np.ndarray, groups: Mapping[int, np.ndarray]) -> np.ndarray:
    """[k, Dv] in `feats`' dtype: the features [n, 576, Dv] of the packed order's tokens (NEWLINE slots left
    out); a merged slot (a key of `groups`) gets the mean of its group's features instead (summed in float64)."""
    flat = feats.reshape(-1, feats.shape[-1])
    ids = order[order != NEWLINE]
    rows = flat[ids]
    if groups:
        merged = MergedGroups.of(groups)
        where = np.full(flat.shape[0], -1, dtype=np.int64)
        where[ids] = np.arange(ids.shape[0])
        sums = np.add.reduceat(flat[merged.members].astype(np.float64), merged.starts, axis=0)
        rows[where[merged.slots]] = sums / merged.sizes[:, None]
    return rows
