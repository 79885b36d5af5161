"""HiRED packing: the order in which the kept visual tokens are fed to the LLM.

    order = pack_tokens(keep, layout, cfg)   # int64 [L]: image_index * 576 + token, or NEWLINE

The span is the kept base-image tokens in raster order, then the kept crop tokens in raster order of the
stitched, unpadded (rows*24 x cols*24) canvas, so crops side by side interleave row by row.
newlines="rows" adds a NEWLINE after each canvas row that keeps a token. At rate 1.0 the span is stock
LLaVA-NeXT's whatever the options: all 576 base tokens, then every unpadded canvas row followed by a NEWLINE.
"""

from __future__ import annotations

import numpy as np

from hired.config import HiredConfig
from hired.layout import AnyresLayout

NEWLINE = -1


def check_indices(image: int, indices: np.ndarray, tokens: int) -> None:
    """ValueError unless keep[image], `indices`, is a 1-D integer array, sorted ascending, in [0, tokens)."""
    if indices.ndim != 1 or (indices.size and indices.dtype.kind not in "iu"):
        raise ValueError(f"keep[{image}] must be a 1-D integer array, got {indices.dtype} {indices.shape}")
    if indices.size and (indices.min() < 0 or indices.max() >= tokens):
        raise ValueError(f"keep[{image}] has indices outside [0, {tokens})")
    if np.any(np.diff(indices) <= 0):
        raise ValueError(f"keep[{image}] must be sorted ascending without repeats")


def flat_ids(arrays: list[np.ndarray], tokens: int) -> np.ndarray | None:
    """int64 [sum of sizes]: image * tokens + index for every index of arrays[image], or None unless every array
    passes check_indices. All images at once: the flat ids are strictly ascending and each in its own image's range
    exactly when every array is sorted, without repeats and in [0, tokens)."""
    if not all(a.ndim == 1 and (a.dtype.kind in "iu" or not a.size) for a in arrays):
        return None
    flat = np.concatenate([a.astype(np.int64) + image * tokens for image, a in enumerate(arrays)])
    owner = np.repeat(np.arange(len(arrays)), [a.size for a in arrays])
    if np.any(flat // tokens != owner) or np.any(np.diff(flat) <= 0):
        return None
    return flat


def kept_flags(keep: list[np.ndarray], layout: AnyresLayout) -> np.ndarray:
    """bool [n_images * 576]: True at image_index * 576 + token for each kept token; checks `keep`."""
    tokens = layout.tokens_per_image
    if len(keep) != layout.n_images:
        raise ValueError(
            f"keep must hold {layout.n_images} index arrays (base image first, then {layout.n_crops} crops), "
            f"got {len(keep)}"
        )
    arrays = [np.asarray(indices) for indices in keep]
    flat = flat_ids(arrays, tokens)
    if flat is None:  # name the first bad array
        for image, indices in enumerate(arrays):
            check_indices(image, indices, tokens)
    flags = np.zeros(layout.n_images * tokens, dtype=bool)
    flags[flat] = True
    padding = flags.reshape(layout.n_images, tokens)[1:] & ~layout.valid_mask
    if padding.any():
        crop, token = (int(x[0]) for x in np.nonzero(padding))
        raise ValueError(f"keep[{crop + 1}] holds padding token {token}, which unpadding removes")
    return flags


def pack_tokens(keep: list[np.ndarray], layout: AnyresLayout, cfg: HiredConfig) -> np.ndarray:
    """int64 [L]: the visual span, each entry image_index * 576 + token (image 0 = base) or NEWLINE.

    keep: 1 + n_crops sorted index arrays as select_tokens returns them. At rate 1.0 `keep` must hold
    every valid token (ValueError otherwise).
    """
    flags = kept_flags(keep, layout)
    canvas = layout.canvas_tokens
    kept_cells = flags[canvas]
    if cfg.is_stock:
        expected = layout.tokens_per_image + canvas.size
        got = int(flags.sum())
        if got != expected:
            raise ValueError(
                f"rate 1.0 packs the stock span, which needs all {expected} valid tokens, got {got}; "
                "select them with a rate-1.0 plan"
            )
        newline_rows = np.ones(canvas.shape[0], dtype=bool)
    elif cfg.newlines == "rows":
        newline_rows = kept_cells.any(axis=1)
    else:
        newline_rows = np.zeros(canvas.shape[0], dtype=bool)
    ids = np.concatenate([canvas, np.full((canvas.shape[0], 1), NEWLINE, dtype=np.int64)], axis=1)
    take = np.concatenate([kept_cells, newline_rows[:, None]], axis=1)
    base = np.asarray(keep[0], dtype=np.int64)
    return np.concatenate([base, ids[take]]).astype(np.int64)
