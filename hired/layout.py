"""Anyres layout: where LLaVA-NeXT puts an image's crops, padding and tokens (numpy only).

One image of (height, width) pixels becomes a base image (the whole picture squashed to one crop) plus
a grid of crops cut from a best-resolution canvas, on which the image is resized with its aspect kept
and pasted centred on black padding. Every number here agrees with transformers' LlavaNext for every
image size: `select_best_resolution`, `get_patch_output_size`, `_pad_for_patching`,
`get_anyres_image_grid_shape`, and `unpad_image` applied to the stitched token canvas.

    layout = AnyresLayout.for_image(width=800, height=600, grid_pinpoints=[[336, 672], [672, 672]])
    layout.grid, layout.capacities, layout.stock_tokens

Axis order is (height, width) everywhere, as in transformers' grid pinpoints.

No pinpoints (LLaVA-1.5) means one partition: the image's shortest edge is resized to the crop size and the
middle crop_size x crop_size square is kept (CLIPImageProcessor), so the layout has no crops (grid (0, 0)), no
canvas and no newline rows; `resized` is the size after the shortest-edge resize and `pad` the (top, left)
of the centre crop inside it.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

HW = tuple[int, int]


def _positive_int(value: object, what: str) -> int:
    """`value` as a Python int >= 1, else ValueError naming `what`."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or int(value) < 1:
        raise ValueError(f"{what} must be a positive integer, got {value!r}")
    return int(value)


def _pinpoints(grid_pinpoints: object, crop_size: int) -> tuple[HW, ...]:
    """Validated grid pinpoints as a tuple of (height, width) pairs, each a multiple of `crop_size` (empty: one
    partition, LLaVA-1.5)."""
    if isinstance(grid_pinpoints, (str, bytes)) or not isinstance(grid_pinpoints, Sequence):
        raise ValueError(
            f"grid_pinpoints must be a list of (height, width) pairs (empty for one partition), got {grid_pinpoints!r}"
        )
    pins = []
    for pin in grid_pinpoints:
        if isinstance(pin, (str, bytes)) or not isinstance(pin, Sequence) or len(pin) != 2:
            raise ValueError(f"each grid pinpoint must be a (height, width) pair, got {pin!r}")
        h = _positive_int(pin[0], "grid pinpoint height")
        w = _positive_int(pin[1], "grid pinpoint width")
        if h % crop_size or w % crop_size:
            raise ValueError(
                f"grid pinpoint (height, width) = ({h}, {w}) is not a multiple of crop_size {crop_size}; "
                "use pinpoints that tile into whole crops"
            )
        pins.append((h, w))
    return tuple(pins)


def select_best_resolution(original_hw: HW, grid_pinpoints: Sequence[HW]) -> HW:
    """The pinpoint (height, width) that keeps most of the image's pixels, then wastes least canvas.

    Same float arithmetic as transformers' `select_best_resolution`; the first pinpoint wins exact ties.
    """
    orig_h, orig_w = original_hw
    best, best_effective, best_wasted = None, 0, math.inf
    for pin_h, pin_w in grid_pinpoints:
        scale = min(pin_w / orig_w, pin_h / orig_h)
        effective = min(int(orig_w * scale) * int(orig_h * scale), orig_w * orig_h)
        wasted = pin_w * pin_h - effective
        if effective > best_effective or (effective == best_effective and wasted < best_wasted):
            best, best_effective, best_wasted = (pin_h, pin_w), effective, wasted
    return best


def patch_output_size(original_hw: HW, target_hw: HW) -> HW:
    """(new_h, new_w) of the image resized into `target_hw` with its aspect kept.

    The limiting side equals the target; the other is ceil(side * scale), capped at the target.
    """
    orig_h, orig_w = original_hw
    target_h, target_w = target_hw
    scale_w, scale_h = target_w / orig_w, target_h / orig_h
    if scale_w < scale_h:
        return min(math.ceil(orig_h * scale_w), target_h), target_w
    return target_h, min(math.ceil(orig_w * scale_h), target_w)


def paste_offset(resized_hw: HW, canvas_hw: HW) -> HW:
    """(top, left) where the resized image is pasted on the canvas: half the slack, rounded down."""
    return (canvas_hw[0] - resized_hw[0]) // 2, (canvas_hw[1] - resized_hw[1]) // 2


def crop_grid_shape(canvas_hw: HW, crop_size: int) -> HW:
    """(rows, cols) of crops tiling the best-resolution canvas."""
    return canvas_hw[0] // crop_size, canvas_hw[1] // crop_size


def unpadded_extent(original_hw: HW, token_canvas_hw: HW) -> tuple[HW, HW]:
    """((row_start, row_stop), (col_start, col_stop)) of the token canvas that survives unpadding.

    LLaVA-NeXT's `unpad_image` on the stitched [rows*side, cols*side] token canvas: the image's extent
    along the padded axis is rounded to 7 decimals and truncated, the padding is half the slack rounded
    down and cut from both ends (so an odd slack keeps one token more than the image's extent).
    """
    orig_h, orig_w = original_hw
    cur_h, cur_w = token_canvas_hw
    if orig_w / orig_h > cur_w / cur_h:
        new_h = int(round(orig_h * (cur_w / orig_w), 7))
        pad = (cur_h - new_h) // 2
        return (pad, cur_h - pad), (0, cur_w)
    new_w = int(round(orig_w * (cur_h / orig_h), 7))
    pad = (cur_w - new_w) // 2
    return (0, cur_h), (pad, cur_w - pad)


def shortest_edge_size(original_hw: HW, shortest_edge: int) -> HW:
    """(new_h, new_w) of transformers' resize to `shortest_edge` with the aspect kept (the long side truncated)."""
    h, w = original_hw
    short, long = min(h, w), max(h, w)
    new_long = int(shortest_edge * long / short)
    return (new_long, shortest_edge) if w <= h else (shortest_edge, new_long)


def canvas_token_ids(grid: HW, side: int) -> np.ndarray:
    """int64 [rows*side, cols*side]: the stitched crop canvas, each cell = crop*side*side + token.

    Crops are numbered row-major over the grid from 0; tokens row-major inside their crop.
    """
    rows, cols = grid
    r = np.arange(rows * side)[:, None]
    c = np.arange(cols * side)[None, :]
    crop = (r // side) * cols + c // side
    token = (r % side) * side + c % side
    return (crop * side * side + token).astype(np.int64)


def base_token_crops(resized_hw: HW, pad_tl: HW, grid: HW, side: int, crop_size: int) -> np.ndarray:
    """int64 [side*side]: the crop (row-major) holding the centre of each base-image token.

    Base token (r, c) covers the image point ((r + 0.5) / side, (c + 0.5) / side); on the canvas that is
    x = left + (c + 0.5) / side * new_w, y = top + (r + 0.5) / side * new_h, in crop
    (floor(y / crop_size), floor(x / crop_size)), clamped to the grid.
    """
    new_h, new_w = resized_hw
    top, left = pad_tl
    rows, cols = grid
    centre = np.arange(side, dtype=np.float64) + 0.5
    y = top + centre / side * new_h
    x = left + centre / side * new_w
    crop_r = np.clip(np.floor(y / crop_size).astype(np.int64), 0, rows - 1)
    crop_c = np.clip(np.floor(x / crop_size).astype(np.int64), 0, cols - 1)
    return (crop_r[:, None] * cols + crop_c[None, :]).reshape(-1)


def _frozen(array: np.ndarray) -> np.ndarray:
    array.setflags(write=False)
    return array


@dataclass(frozen=True, eq=False)
class AnyresLayout:
    """The anyres geometry of one image; build it with `AnyresLayout.for_image`.

    Pixel facts: width, height (the original image), best_resolution (bh, bw), resized (new_h, new_w),
    pad (top, left), grid (rows, cols). Token facts: side (tokens per crop side), valid_mask
    [n_crops, side*side] (crop tokens that survive unpadding), capacities [n_crops], canvas_tokens
    [unpadded_rows, unpadded_cols] (the unpadded canvas as packed ids image_index*side*side + token,
    image 0 being the base image), base_to_crop [side*side].
    """

    width: int
    height: int
    grid_pinpoints: tuple[HW, ...]
    crop_size: int
    patch_size: int
    best_resolution: HW
    resized: HW
    pad: HW
    grid: HW
    side: int
    unpadded_row_range: HW
    unpadded_col_range: HW
    valid_mask: np.ndarray = field(repr=False)
    capacities: np.ndarray = field(repr=False)
    canvas_tokens: np.ndarray = field(repr=False)
    base_to_crop: np.ndarray = field(repr=False)

    @classmethod
    def for_image(
        cls,
        *,
        width: int,
        height: int,
        grid_pinpoints: Sequence[Sequence[int]],
        crop_size: int = 336,
        patch_size: int = 14,
    ) -> AnyresLayout:
        """Layout of a `width` x `height` pixel image; pinpoints are (height, width) pairs.

        Raises ValueError for a non-positive or non-integer size, a crop size that is not a multiple of
        the patch size, or pinpoints that do not tile into whole crops.
        """
        width = _positive_int(width, "image width (pixels)")
        height = _positive_int(height, "image height (pixels)")
        crop_size = _positive_int(crop_size, "crop_size")
        patch_size = _positive_int(patch_size, "patch_size")
        if crop_size % patch_size:
            raise ValueError(f"crop_size {crop_size} is not a multiple of patch_size {patch_size}")
        pins = _pinpoints(grid_pinpoints, crop_size)
        side = crop_size // patch_size
        if not pins:
            return cls._single(width, height, crop_size, patch_size, side)

        best = select_best_resolution((height, width), pins)
        resized = patch_output_size((height, width), best)
        pad = paste_offset(resized, best)
        grid = crop_grid_shape(best, crop_size)
        rows_range, cols_range = unpadded_extent((height, width), (grid[0] * side, grid[1] * side))

        canvas = canvas_token_ids(grid, side)
        kept = canvas[rows_range[0] : rows_range[1], cols_range[0] : cols_range[1]]
        n_crops = grid[0] * grid[1]
        valid = np.zeros(n_crops * side * side, dtype=bool)
        valid[kept.reshape(-1)] = True
        valid = valid.reshape(n_crops, side * side)

        return cls(
            width=width,
            height=height,
            grid_pinpoints=pins,
            crop_size=crop_size,
            patch_size=patch_size,
            best_resolution=best,
            resized=resized,
            pad=pad,
            grid=grid,
            side=side,
            unpadded_row_range=rows_range,
            unpadded_col_range=cols_range,
            valid_mask=_frozen(valid),
            capacities=_frozen(valid.sum(axis=1).astype(np.int64)),
            canvas_tokens=_frozen(kept + side * side),
            base_to_crop=_frozen(base_token_crops(resized, pad, grid, side, crop_size)),
        )

    @classmethod
    def _single(cls, width: int, height: int, crop_size: int, patch_size: int, side: int) -> AnyresLayout:
        """One partition (no pinpoints): the centre crop of the shortest-edge resize, no crops, no canvas."""
        resized = shortest_edge_size((height, width), crop_size)
        top, left = (resized[0] - crop_size) // 2, (resized[1] - crop_size) // 2
        return cls(
            width=width,
            height=height,
            grid_pinpoints=(),
            crop_size=crop_size,
            patch_size=patch_size,
            best_resolution=(crop_size, crop_size),
            resized=resized,
            pad=(top, left),
            grid=(0, 0),
            side=side,
            unpadded_row_range=(0, 0),
            unpadded_col_range=(0, 0),
            valid_mask=_frozen(np.zeros((0, side * side), dtype=bool)),
            capacities=_frozen(np.zeros(0, dtype=np.int64)),
            canvas_tokens=_frozen(np.zeros((0, 0), dtype=np.int64)),
            base_to_crop=_frozen(np.full(side * side, -1, dtype=np.int64)),
        )

    @property
    def single(self) -> bool:
        """True for a one-partition layout (no grid pinpoints: LLaVA-1.5)."""
        return not self.grid_pinpoints

    @property
    def n_crops(self) -> int:
        """Number of crops: rows * cols."""
        return self.grid[0] * self.grid[1]

    @property
    def n_images(self) -> int:
        """Images fed to the vision tower: the base image plus the crops."""
        return 1 + self.n_crops

    @property
    def tokens_per_image(self) -> int:
        """Patch tokens per image (576 for a 336 px crop and 14 px patches)."""
        return self.side * self.side

    @property
    def unpadded_rows(self) -> int:
        """Rows of the unpadded token canvas."""
        return self.unpadded_row_range[1] - self.unpadded_row_range[0]

    @property
    def unpadded_cols(self) -> int:
        """Columns of the unpadded token canvas."""
        return self.unpadded_col_range[1] - self.unpadded_col_range[0]

    @property
    def stock_tokens(self) -> int:
        """Stock LLaVA-NeXT visual span: the base image, then each unpadded canvas row and a newline."""
        return self.tokens_per_image + self.unpadded_rows * (self.unpadded_cols + 1)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, AnyresLayout):
            return NotImplemented
        return (self.width, self.height, self.grid_pinpoints, self.crop_size, self.patch_size) == (
            other.width,
            other.height,
            other.grid_pinpoints,
            other.crop_size,
            other.patch_size,
        )

    def __hash__(self) -> int:
        return hash((self.width, self.height, self.grid_pinpoints, self.crop_size, self.patch_size))
