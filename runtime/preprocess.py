"""LLaVA-NeXT "anyres" preprocessing in numpy + pillow: uint8 RGB -> pixel_values [1 + n_crops, 3, crop, crop].

    pre = preprocess(load_image("cat.jpg"), manifest.image_processor, patch_size=manifest.vision.patch_size)
    pre.pixel_values   # float32 [1 + n_crops, 3, 336, 336]: the base image first, then the crops row-major
    pre.layout         # hired.AnyresLayout: best resolution, resized size, padding, crop grid
    pre.image_size     # (height, width) of the input

It equals transformers' LlavaNextImageProcessorPil because it runs the same steps in the same dtypes:
1. Resize the image (PIL, uint8, `spec.resample`) to `layout.resized` (aspect kept, transformers'
   get_patch_output_size) and paste it at `layout.pad` on a zero uint8 canvas of `layout.best_resolution`.
2. Cut the canvas into crop_size x crop_size crops, row-major.
3. The base image: the original resized (PIL, uint8) to shortest_edge x shortest_edge, squashed.
4. Every patch (base, then crops): resized so its shortest edge is `shortest_edge` (a no-op, PIL returns a
   copy, when crop_size == shortest_edge), then centre-cropped to crop_size (zero-padded where smaller).
5. Rescale uint8 -> float64 * rescale_factor -> float32, then normalise in float32, (x - mean) / std. The
   padding is 0 before this step, so it becomes -mean / std, as in transformers.
Step 5 maps each channel's 256 possible bytes to fixed floats, so it runs as a lookup table: the same
float32 numbers as transformers' arithmetic, in one gather per channel.

A manifest without grid pinpoints (LLaVA-1.5) is CLIPImageProcessor's: the image's shortest edge resized to
`shortest_edge` (PIL, uint8, aspect kept, the long side truncated), then the centre crop_size square (the
sides of a wide image are cut), then step 5: pixel_values [1, 3, crop, crop].
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import numpy as np
from PIL import Image

from hired import AnyresLayout
from runtime.errors import BundleError, ImageError
from runtime.manifest import ImageProcessorSpec

RESAMPLE = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
    "box": Image.Resampling.BOX,
    "hamming": Image.Resampling.HAMMING,
}
_FIX = "re-run `make export MODEL=<name>` to rebuild the bundle"


@dataclass(frozen=True, eq=False)
class Preprocessed:
    """What the vision graph needs for one image, and the geometry HiRED needs to select its tokens."""

    pixel_values: np.ndarray  # float32 [1 + n_crops, 3, crop, crop]: base image, then crops row-major
    layout: AnyresLayout
    image_size: tuple[int, int]  # (height, width) of the input image


def preprocess(rgb: np.ndarray, spec: ImageProcessorSpec, *, patch_size: int = 14) -> Preprocessed:
    """pixel_values of a uint8 [H, W, 3] RGB image (from `runtime.image.load_image`) under `spec`.

    `patch_size` is the vision tower's (manifest.vision.patch_size); it only shapes the token geometry of
    the returned layout. Raises ImageError for anything but uint8 [H, W, 3] and BundleError for a spec
    the layout refuses (pinpoints that do not tile into crops, an unknown resample).
    """
    rgb = _checked_rgb(rgb)
    height, width = rgb.shape[:2]
    resample = _resample(spec.resample)
    try:
        layout = AnyresLayout.for_image(
            width=width,
            height=height,
            grid_pinpoints=spec.grid_pinpoints,
            crop_size=spec.crop_size,
            patch_size=patch_size,
        )
    except ValueError as e:
        raise BundleError(f"the manifest's image processor settings are invalid: {e}; {_FIX}") from None

    if layout.single:  # CLIPImageProcessor: shortest edge resized, centre crop
        patch = fit_patch(rgb, spec.shortest_edge, spec.crop_size, resample)
        return Preprocessed(pixel_values=normalize(patch[None], spec), layout=layout, image_size=(height, width))
    image = Image.fromarray(rgb)  # mode RGB
    base = np.asarray(image.resize((spec.shortest_edge, spec.shortest_edge), resample))  # [se, se, 3]
    crops = crop_canvas(np.asarray(image.resize(layout.resized[::-1], resample)), layout)  # [n, c, c, 3]
    patches = [fit_patch(p, spec.shortest_edge, spec.crop_size, resample) for p in (base, *crops)]
    pixel_values = normalize(np.stack(patches), spec)
    return Preprocessed(pixel_values=pixel_values, layout=layout, image_size=(height, width))


def _checked_rgb(rgb: object) -> np.ndarray:
    if not isinstance(rgb, np.ndarray) or rgb.dtype != np.uint8 or rgb.ndim != 3 or rgb.shape[2] != 3:
        what = (
            f"{rgb.dtype} array of shape {rgb.shape}" if isinstance(rgb, np.ndarray) else type(rgb).__name__
        )
        raise ImageError(
            f"preprocess takes a uint8 [H, W, 3] RGB array, got {what}; pass it through load_image"
        )
    if rgb.shape[0] < 1 or rgb.shape[1] < 1:
        raise ImageError(
            f"image is {rgb.shape[1]}x{rgb.shape[0]} pixels; pass an image with both sides >= 1 pixel"
        )
    return np.ascontiguousarray(rgb)


def _resample(name: str) -> Image.Resampling:
    try:
        return RESAMPLE[name.lower()]
    except (KeyError, AttributeError):
        raise BundleError(
            f"unknown resample {name!r} in the manifest's image processor; expected one of "
            f"{', '.join(RESAMPLE)}; {_FIX}"
        ) from None


def crop_canvas(resized: np.ndarray, layout: AnyresLayout) -> np.ndarray:
    """uint8 [rows*cols, crop, crop, 3]: `resized` [new_h, new_w, 3] pasted on the zero canvas, cut row-major."""
    (canvas_h, canvas_w), (top, left), (rows, cols) = layout.best_resolution, layout.pad, layout.grid
    new_h, new_w = layout.resized
    crop = layout.crop_size
    canvas = np.zeros((canvas_h, canvas_w, 3), dtype=np.uint8)
    canvas[top : top + new_h, left : left + new_w] = resized
    return (
        canvas.reshape(rows, crop, cols, crop, 3).transpose(0, 2, 1, 3, 4).reshape(rows * cols, crop, crop, 3)
    )


def fit_patch(
    patch: np.ndarray, shortest_edge: int, crop_size: int, resample: Image.Resampling
) -> np.ndarray:
    """uint8 [crop, crop, 3] of a uint8 [h, w, 3] patch: resized so its shortest edge is shortest_edge, centre-cropped.

    transformers' per-patch `resize(size={"shortest_edge"})` and `center_crop(crop_size)`; with
    h == w == shortest_edge == crop_size (LLaVA-NeXT's squares) it returns the patch unchanged.
    """
    if patch.shape[:2] != (shortest_edge, shortest_edge):
        h, w = patch.shape[:2]
        short, long = min(h, w), max(h, w)
        new_short, new_long = shortest_edge, int(shortest_edge * long / short)
        new_h, new_w = (new_long, new_short) if w <= h else (new_short, new_long)
        patch = np.asarray(Image.fromarray(patch).resize((new_w, new_h), resample))
    return center_crop(patch, crop_size)


def center_crop(image: np.ndarray, size: int) -> np.ndarray:
    """uint8 [size, size, C] from the middle of `image` [H, W, C]; a side shorter than `size` is zero-padded.

    As transformers' `center_crop`: a longer side starts at (side - size) // 2, a shorter side is placed
    at ceil((size - side) / 2).
    """
    h, w = image.shape[:2]
    if (h, w) == (size, size):
        return image
    out = np.zeros((size, size, image.shape[2]), dtype=image.dtype)
    src_y, dst_y, n_y = _crop_axis(h, size)
    src_x, dst_x, n_x = _crop_axis(w, size)
    out[dst_y : dst_y + n_y, dst_x : dst_x + n_x] = image[src_y : src_y + n_y, src_x : src_x + n_x]
    return out


def _crop_axis(side: int, size: int) -> tuple[int, int, int]:
    """(source start, destination start, length) of one axis of a centre crop."""
    if side >= size:
        return (side - size) // 2, 0, size
    return 0, math.ceil((size - side) / 2), side


def normalize(patches: np.ndarray, spec: ImageProcessorSpec) -> np.ndarray:
    """float32 [N, 3, crop, crop] of uint8 [N, crop, crop, 3]: rescaled and normalised, channels first."""
    table = _normalize_table(spec.rescale_factor, tuple(spec.image_mean), tuple(spec.image_std))  # [3, 256]
    out = np.empty((patches.shape[0], 3, patches.shape[1], patches.shape[2]), dtype=np.float32)
    for c in range(3):
        np.take(table[c], patches[..., c], out=out[:, c])
    return out


@functools.lru_cache(maxsize=8)
def _normalize_table(rescale_factor: float, mean: tuple[float, ...], std: tuple[float, ...]) -> np.ndarray:
    """float32 [3, 256]: transformers' rescale then normalise of every byte value, per channel.

    rescale: (v as float64 * factor) cast to float32; normalise: (x - float32(mean)) / float32(std) in float32.
    """
    if len(mean) != 3 or len(std) != 3 or not all(s != 0 for s in std):
        raise BundleError(
            f"image_mean/image_std must hold 3 numbers each, std non-zero; got {mean}, {std}; {_FIX}"
        )
    scaled = (np.arange(256, dtype=np.float64) * rescale_factor).astype(np.float32)  # [256]
    mean32 = np.asarray(mean, dtype=np.float32)[:, None]
    std32 = np.asarray(std, dtype=np.float32)[:, None]
    table = (scaled[None, :] - mean32) / std32  # float32 [3, 256]
    table.setflags(write=False)
    return table
