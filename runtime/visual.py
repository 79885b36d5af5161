"""The image side of one request, for one image or several: each image its own layout, vision run, HiRED plan
(at the request's rate), projection; then the prompt's text segments spliced around the images' spans in order.

    images = image_list([img_a, img_b])                   # None -> [], one image -> [it], a list -> the list
    parts = [ImagePart(preprocess(...)) for ...]          # runtime.pipeline fills vision/selection/visual per part
    embeds = splice(table, segments, [p.visual for p in parts])
    visual_tokens(parts)                                  # the result's {before, kept, per_image, images}

`per_image` is one flat list of kept patch tokens per partition over all images in prompt order (base image
first within each image); `images` gives {before, kept} per input image (only with several images).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from hired.budget import requested_total
from hired.selectors import Selection
from runtime.errors import ImageError
from runtime.preprocess import Preprocessed


def image_list(image) -> list:
    """The request's images: None or [] -> [] (text only), a list or tuple -> its items, anything else -> [it]."""
    if image is None:
        return []
    if isinstance(image, list | tuple):
        for i, item in enumerate(image):
            if item is None or isinstance(item, list | tuple):
                raise ImageError(
                    f"image {i} of the list is {type(item).__name__}; pass a list of images (paths, bytes, PIL images "
                    "or uint8 arrays)"
                )
        return list(image)
    return [image]


@dataclass
class ImagePart:
    """One input image through the stages: its preprocessing, then what vision/select/project made of it."""

    pre: Preprocessed
    feats: np.ndarray | None = None  # [n, 576, Dv]
    early: np.ndarray | None = None  # [n, 576]
    late: np.ndarray | None = None  # [n, 576]
    selection: Selection | None = None
    order: np.ndarray | None = None  # [span] packed: partition * 576 + token, or NEWLINE
    visual: np.ndarray | None = None  # [span, Dt]

    @property
    def layout(self):
        return self.pre.layout


def splice(table: np.ndarray, segments: list[list[int]], visuals: list[np.ndarray]) -> np.ndarray:
    """inputs_embeds [L, Dt]: the embeddings of segments[0], visuals[0], segments[1], ..., segments[-1]."""
    parts = [table[segments[0]]]
    for ids, visual in zip(segments[1:], visuals):
        parts.append(visual.astype(table.dtype, copy=False))
        parts.append(table[ids])
    return np.concatenate(parts)


def visual_tokens(parts: list[ImagePart]) -> dict:
    """The result's visual_tokens: before/kept summed over the images, per_image flat over all partitions,
    and `images` ({before, kept} per input image) when there are several."""
    per_image = tuple(len(k) for p in parts for k in p.selection.keep)
    images = tuple({"before": int(p.layout.stock_tokens), "kept": int(p.order.shape[0])} for p in parts)
    out = {"before": sum(i["before"] for i in images), "kept": sum(i["kept"] for i in images), "per_image": per_image}
    if len(parts) > 1:
        out["images"] = images
    return out


IMAGE_FIELDS = ("pixel_values", "early_scores", "late_scores", "features", "groups", "kept_indices", "layout", "plan",
                "order")  # the per-image fields of runtime.pipeline.Trace


def fill_trace(trace, parts: list[ImagePart]) -> None:
    """Fill a runtime.pipeline.Trace: `images` gets one Trace per image; with one image its fields are also the
    trace's own (as before several images existed)."""
    trace.images = [
        type(trace)(pixel_values=p.pre.pixel_values, early_scores=p.early, late_scores=p.late, features=p.feats,
                    groups=p.selection.groups, kept_indices=p.selection.keep, layout=p.layout, plan=p.selection.plan,
                    order=p.order)  # fmt: skip
        for p in parts
    ]
    if len(parts) == 1:
        for name in IMAGE_FIELDS:
            setattr(trace, name, getattr(trace.images[0], name))


def span_bound(layout, cfg) -> int:
    """The most tokens an image's visual span can take under `cfg` (a HiredConfig), known before vision runs.

    rate 1.0: the stock span (layout.stock_tokens), exactly. Otherwise the kept patch tokens, at most
    min(T, 576 + sum of crop capacities) with T = int(n * 576 * rate) (exact for the spatial distribution and every
    selector; official plans keep <= T, padding dropped), plus one newline slot per unpadded canvas row with
    newlines="rows" (exact when every row keeps a token)."""
    if cfg.is_stock:
        return int(layout.stock_tokens)
    total = requested_total(layout.n_images, layout.tokens_per_image, cfg.rate)
    patches = min(total, layout.tokens_per_image + int(layout.capacities.sum()))
    return patches + (layout.unpadded_rows if cfg.newlines == "rows" else 0)


def budget_total(parts: list[ImagePart]) -> int:
    """T summed over the images (each image's T = int(n * 576 * rate))."""
    return sum(int(p.selection.plan.total) for p in parts)


__all__ = ["IMAGE_FIELDS", "ImagePart", "budget_total", "fill_trace", "image_list", "span_bound", "splice",
           "visual_tokens"]
