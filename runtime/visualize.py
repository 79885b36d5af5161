"""The picture a user checks the budget with: kept patches lit, dropped ones dimmed, padding greyed out.

Base image on the left, the crops in their grid on the right, counts in a caption below. Tokens a selector merged
(VisionZip's contextual tokens) are half lit, each group's cells outlined in the group's colour.
"""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw

from runtime.manifest import ImageProcessorSpec

_GAP = 16
_CAPTION = 56
_GROUP_COLOURS = ((230, 25, 75), (60, 180, 75), (0, 130, 200), (245, 130, 48), (145, 30, 180), (70, 240, 240),
                  (240, 50, 230), (210, 245, 60), (250, 190, 212), (0, 128, 128))  # fmt: skip


def _denormalize(pixel_values: np.ndarray, spec: ImageProcessorSpec) -> np.ndarray:
    """[n, 3, s, s] normalised floats -> [n, s, s, 3] uint8."""
    mean = np.asarray(spec.image_mean, dtype=np.float32)[None, :, None, None]
    std = np.asarray(spec.image_std, dtype=np.float32)[None, :, None, None]
    rgb = (pixel_values.astype(np.float32) * std + mean) / spec.rescale_factor
    return np.clip(np.rint(rgb), 0, 255).astype(np.uint8).transpose(0, 2, 3, 1)


def _shade(img: np.ndarray, kept: np.ndarray, valid: np.ndarray, side: int, merged: np.ndarray | None = None) -> np.ndarray:
    """img [s, s, 3]; kept/valid/merged bool [side*side] -> dropped tokens at 25% brightness, merged ones at 60%,
    padding grey."""
    s = img.shape[0]
    cell = s // side
    factor = np.where(kept, 1.0, np.where(merged, 0.6, 0.25) if merged is not None else 0.25).reshape(side, side)
    out = img.astype(np.float32) * np.kron(factor, np.ones((cell, cell)))[:, :, None]
    pad = np.kron((~valid).reshape(side, side), np.ones((cell, cell), dtype=bool))
    out[pad] = 90.0
    return out.astype(np.uint8)


def render_kept(trace, spec: ImageProcessorSpec, result=None, image: int = 0) -> Image.Image:
    """trace: the runtime.pipeline.Trace that Pipeline.generate(..., trace=) filled, or one of its `images` (then
    `image` is its index, for the caption's counts). Returns an RGB image."""
    if trace.layout is None:
        raise ValueError("the trace holds no image stages (a text-only request); nothing to draw")
    layout, keep = trace.layout, trace.kept_indices
    images = _denormalize(trace.pixel_values, spec)
    side, s = layout.side, images.shape[1]
    rows, cols = layout.grid
    n_tok = side * side
    width = s + _GAP + cols * s
    height = max(s, rows * s) + _CAPTION
    canvas = Image.new("RGB", (width, height), (255, 255, 255))

    def mask(idx):
        m = np.zeros(n_tok, dtype=bool)
        m[np.asarray(idx, dtype=np.int64)] = True
        return m

    groups = dict(getattr(trace, "groups", None) or {})
    members = np.zeros(layout.n_images * n_tok, dtype=bool)
    for flat in groups.values():
        members[np.asarray(flat, dtype=np.int64)] = True
    members = members.reshape(layout.n_images, n_tok)
    kept_alone = [mask(k) & ~members[i] for i, k in enumerate(keep)]  # a merged slot is drawn as its group
    canvas.paste(Image.fromarray(_shade(images[0], kept_alone[0], np.ones(n_tok, bool), side, members[0])), (0, 0))
    for c in range(layout.n_crops):
        r, q = divmod(c, cols)
        tile = _shade(images[1 + c], kept_alone[1 + c], layout.valid_mask[c], side, members[1 + c])
        canvas.paste(Image.fromarray(tile), (s + _GAP + q * s, r * s))
    draw = ImageDraw.Draw(canvas)
    cell = s // side
    for g, flat in enumerate(groups.values()):
        for token_id in np.asarray(flat, dtype=np.int64):
            image, token = divmod(int(token_id), n_tok)
            r, q = divmod(image - 1, cols) if image else (0, 0)
            tr, tc = divmod(token, side)
            x0, y0 = (s + _GAP + q * s if image else 0) + tc * cell, (r * s if image else 0) + tr * cell
            draw.rectangle([x0, y0, x0 + cell - 1, y0 + cell - 1], outline=_GROUP_COLOURS[g % len(_GROUP_COLOURS)])
    for c in range(layout.n_crops):
        r, q = divmod(c, cols)
        x0, y0 = s + _GAP + q * s, r * s
        draw.rectangle([x0, y0, x0 + s - 1, y0 + s - 1], outline=(255, 200, 0), width=2)
    crops_kept = sum(len(k) for k in keep[1:])
    cap = int(layout.capacities.sum())
    line1 = (
        f"base {len(keep[0])}/{n_tok} kept | crops {crops_kept}/{cap} kept "
        f"({layout.n_crops * n_tok - cap} padding tokens never kept) | grid {rows}x{cols}"
        + (f" | {len(groups)} merged tokens (outlined groups)" if groups else "")
    )
    line2 = ""
    if result is not None:
        b, v = result.budget, result.visual_tokens
        v = v["images"][image] if "images" in v else v
        line2 = (
            f"{getattr(result, 'selector', 'hired')} {'auto ' if b.get('requested') == 'auto' else ''}"
            f"budget {b['rate']} alpha {b['alpha']} {b['distribution']}: total {b['total']}, "
            f"span fed to the LLM {v['kept']} of stock {v['before']}"
        )
    y = max(s, rows * s) + 8
    draw.text((8, y), line1, fill=(0, 0, 0))
    draw.text((8, y + 20), line2, fill=(0, 0, 0))
    return canvas
