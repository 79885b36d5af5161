"""Image input: a path, encoded bytes, a PIL image or a numpy array -> uint8 [H, W, 3] RGB (numpy + pillow only).

    rgb = load_image("cat.jpg")                        # path (str / PathLike), bytes, PIL.Image or array
    rgb = load_image(frame, color="bgr")               # OpenCV-style camera frame, HxWx3 (BGR) or HxWx4 (BGRA)
    rgb = load_image(big_png, max_pixels=100_000_000)  # raise the size limit (default 64 Mpx)

What each input becomes (the reference is transformers' LlavaNext image processor, PIL backend):
- Files and bytes are identified lazily and their size is read from the header and checked against
  `max_pixels` BEFORE any pixel is decoded. PIL's own decompression-bomb limit is not used (it would refuse
  or warn before we can read the size); `max_pixels` replaces it. Truncated or corrupt data is refused,
  never loaded partially. The EXIF orientation is applied, as `transformers.image_utils.load_image` does.
  Multi-frame files (GIF, APNG, TIFF) give their first frame.
- PIL images (and decoded files) convert as transformers' `convert_to_rgb`: anything with an alpha band or
  a `transparency` entry (RGBA, LA, PA, P or L with transparency) is composited on white with
  `Image.alpha_composite`; every other mode (P, L, 1, CMYK, YCbCr, I, F, ...) goes through
  `Image.convert("RGB")`. One deliberate difference: 16-bit modes (I;16, I;16B, ...) keep their high byte
  (value >> 8, as Pillow does for 16-bit RGB PNGs), where `convert("RGB")` would clip every value above
  255 to white. A PIL image passed in is used as is (no EXIF rotation), exactly like the processor.
- Arrays are ALWAYS channels-last, never guessed: HxW or HxWx1 (gray, replicated), HxWx3 (RGB, or BGR with
  `color="bgr"`), HxWx4 (RGBA, or BGRA with `color="bgr"`; composited on white with transformers' numpy
  formula round(a/255 * rgb + (1 - a/255) * 255), computed exactly in integers). Only dtype uint8 is
  accepted: bool, uint16, other integer and float arrays are refused with the conversion to use, because
  their range (0..1, 0..255, 0..65535) cannot be known from the array. A uint8 HxWx3 RGB array that is
  already C-contiguous is returned as is (no copy).

Every refusal is a `runtime.errors.ImageError` of one line that says what was wrong and what to do.
"""

from __future__ import annotations

import io
import numbers
import os
import stat
import struct
from typing import Any

import numpy as np
from PIL import Image, ImageOps

from runtime.errors import ImageError

DEFAULT_MAX_PIXELS = 64_000_000
COLOR_ORDERS = ("rgb", "bgr")
_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I;16S", "I;16BS", "I;16LS")
RUNS_PROGRAMS = {"EPS": "Ghostscript"}  # formats Pillow decodes with an external program: refused
_NAME_LIMIT = 200  # characters of a path or value shown in a message
_BLOCK_PIXELS = 1 << 20  # pixels per block when compositing RGBA arrays


def load_image(image: Any, *, color: str = "rgb", max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """uint8 [H, W, 3] RGB of `image`: a path, bytes/bytearray/memoryview, a PIL image or a uint8 array.

    `color="bgr"` reads a 3- or 4-channel array as BGR(A) (camera frames); it applies to arrays only.
    Every image with both sides >= 1 pixel and width * height <= `max_pixels` loads; anything else raises
    ImageError.
    """
    _check_options(color, max_pixels)
    if isinstance(image, np.ndarray):
        return array_to_rgb(image, color=color, max_pixels=max_pixels)
    if color != "rgb":
        raise ImageError(
            f"color={color!r} applies to numpy arrays (camera frames) only; files, bytes and PIL images "
            "are decoded as RGB, so pass color='rgb' for them"
        )
    if isinstance(image, Image.Image):
        return pil_to_rgb(image, max_pixels=max_pixels)
    if isinstance(image, bytes | bytearray | memoryview):
        data = image.tobytes() if isinstance(image, memoryview) else image
        return _decode(io.BytesIO(data), f"image data ({len(data)} bytes)", max_pixels)
    if isinstance(image, str | os.PathLike):
        return _load_path(image, max_pixels)
    raise ImageError(
        f"unsupported image type {type(image).__module__}.{type(image).__qualname__}; pass a file path, "
        "encoded bytes, a PIL image or a numpy uint8 array (HxW, HxWx3 or HxWx4)"
    )


# ---- options and sizes ------------------------------------------------------------------------------------
def _check_options(color: object, max_pixels: object) -> None:
    if color not in COLOR_ORDERS:
        raise ImageError(f"color must be 'rgb' or 'bgr', got {color!r}")
    if isinstance(max_pixels, bool) or not isinstance(max_pixels, numbers.Integral) or max_pixels < 1:
        raise ImageError(f"max_pixels must be a positive integer, got {max_pixels!r}")


def format_pixels(count: int) -> str:
    """A pixel count for people: 2_500_000_000 -> '2.5 Gpx', 64_000_000 -> '64 Mpx', 912 -> '912 px'."""
    for unit, scale in (("Gpx", 1e9), ("Mpx", 1e6), ("kpx", 1e3)):
        if count >= scale:
            return f"{count / scale:.3g} {unit}"
    return f"{count} px"


def check_size(width: int, height: int, max_pixels: int) -> None:
    """Refuse an image with a side under 1 pixel or more than `max_pixels` pixels (ImageError)."""
    if width < 1 or height < 1:
        raise ImageError(
            f"image is {width}x{height} pixels (width x height); pass an image with both sides >= 1 pixel"
        )
    pixels = width * height
    if pixels > max_pixels:
        size, limit = format_pixels(pixels), format_pixels(max_pixels)
        if size == limit:  # just over: rounding would print "64 Mpx, over the 64 Mpx limit"
            size, limit = f"{pixels:,} px", f"{max_pixels:,} px"
        raise ImageError(
            f"image is {width}x{height} = {size}, over the {limit} limit; "
            "resize it or raise Pipeline(max_pixels=...)"
        )


def _short(value: object) -> str:
    text = str(value)
    return text if len(text) <= _NAME_LIMIT else text[: _NAME_LIMIT - 1] + "…"


# ---- encoded images (paths and bytes) -----------------------------------------------------------------------
def _load_path(path: str | os.PathLike, max_pixels: int) -> np.ndarray:
    name = _short(os.fsdecode(path))
    if isinstance(path, str) and path.startswith(("http://", "https://", "data:")):
        raise ImageError(
            f"{name} is a URL, which the runtime does not fetch; download it and pass the file path or bytes"
        )
    try:
        if not stat.S_ISREG(os.stat(path).st_mode) and not os.path.isdir(path):
            # open() on a FIFO blocks until a writer comes, and devices never end: refuse, never hang.
            raise ImageError(f"{name} is not a regular file (a FIFO, socket or device); pass the path of one image")
        with open(path, "rb") as fp:
            return _decode(fp, name, max_pixels)
    except FileNotFoundError:
        raise ImageError(f"image file not found: {name}; check the path") from None
    except IsADirectoryError:
        raise ImageError(f"{name} is a directory, not an image file; pass the path of one image") from None
    except PermissionError:
        raise ImageError(f"no permission to read the image file {name}; check its permissions") from None
    except OSError as e:  # e.g. a name too long
        raise ImageError(f"cannot open the image file {name} ({e.strerror or e}); check the path") from None
    except ValueError as e:  # e.g. an embedded NUL character
        raise ImageError(f"{name!r} is not a usable file path ({e}); check the path") from None


def _decode(fp: io.BufferedIOBase, name: str, max_pixels: int) -> np.ndarray:
    """Identify, size-check, then decode the encoded image in `fp` (named `name` in messages)."""
    try:
        im = _open_lazily(fp, name)
        check_size(im.width, im.height, max_pixels)
        im.load()
        ImageOps.exif_transpose(im, in_place=True)
        return _pil_to_rgb_loaded(im, name)
    except ImageError:
        raise
    except Image.DecompressionBombError as e:  # raised by a few plugins (GIF frames, TIFF tiles) on open
        raise ImageError(f"{name} is too large to decode ({e}); resize it") from None
    except MemoryError:
        raise ImageError(f"out of memory decoding {name}; resize the image or lower max_pixels") from None
    except (OSError, ValueError, SyntaxError, EOFError, IndexError, TypeError, KeyError, struct.error) as e:
        raise ImageError(
            f"{name} is truncated or corrupt ({type(e).__name__}: {_short(e)}); re-save or re-download it"
        ) from None


def _open_lazily(fp: io.BufferedIOBase, name: str) -> Image.Image:
    """PIL's format identification (Image.open's plugin loop) without its decompression-bomb check.

    Image.open refuses images over 2 x PIL.Image.MAX_IMAGE_PIXELS before their size can be read, and warns
    above it. The runtime enforces its own `max_pixels` instead, from the header this returns (nothing is
    decoded yet), without touching PIL's global limit.
    """
    head = fp.read(24)
    prefix = head[:16]  # what Image.open shows the plugins' accept functions
    if not prefix:
        raise ImageError(f"{name} is empty; pass a PNG, JPEG, WebP, BMP, GIF or TIFF image")
    tried: set[str] = set()
    for register_plugins in (Image.preinit, Image.init):
        register_plugins()
        for fmt in list(Image.ID):
            if fmt in tried:
                continue
            tried.add(fmt)
            factory, accept = Image.OPEN[fmt]
            verdict = accept(prefix) if accept else True
            if not verdict or isinstance(verdict, str):  # a str is PIL's "looks like X but unsupported"
                continue
            if fmt in RUNS_PROGRAMS:
                raise ImageError(_runs_program_message(name, fmt))
            fp.seek(0)
            try:
                return factory(fp, "")  # as Image.open(file object) does: no file name
            except (SyntaxError, IndexError, TypeError, struct.error):  # not this format after all
                continue
    png_size = _png_header_size(head)
    if png_size is not None and min(png_size) == 0:  # PIL refuses to identify empty images at all
        check_size(*png_size, max_pixels=1)
    raise ImageError(
        f"{name} is not a readable image (unknown format or corrupt header); "
        "pass a PNG, JPEG, WebP, BMP, GIF or TIFF image"
    )


def _runs_program_message(name: str, fmt: str) -> str:
    return (
        f"{name} is {fmt}, which Pillow decodes by running {RUNS_PROGRAMS[fmt]}; the runtime never runs a "
        "program on its input: convert it to PNG or JPEG"
    )


def _png_header_size(head: bytes) -> tuple[int, int] | None:
    """(width, height) from a PNG's IHDR chunk in the file's first 24 bytes, or None if it is not a PNG."""
    if len(head) < 24 or head[:8] != b"\x89PNG\r\n\x1a\n" or head[12:16] != b"IHDR":
        return None
    return struct.unpack(">II", head[16:24])


# ---- PIL images ---------------------------------------------------------------------------------------------
def pil_to_rgb(image: Image.Image, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """uint8 [H, W, 3] of a PIL image, converted as transformers' `convert_to_rgb` (see the module docstring)."""
    check_size(image.width, image.height, max_pixels)
    if image.format in RUNS_PROGRAMS:
        raise ImageError(_runs_program_message("the PIL image", image.format))
    try:
        image.load()
    except (OSError, ValueError, SyntaxError, EOFError, struct.error) as e:
        raise ImageError(
            f"the PIL image could not be loaded ({type(e).__name__}: {_short(e)}); re-save or re-open it"
        ) from None
    return _pil_to_rgb_loaded(image, "the PIL image")


def _pil_to_rgb_loaded(image: Image.Image, name: str) -> np.ndarray:
    if image.mode in _SIXTEEN_BIT_MODES:
        return _sixteen_bit_to_rgb(image)
    if image.mode == "La":  # premultiplied gray + alpha: PIL converts it to LA only
        image = image.convert("LA")
    has_alpha = "A" in image.getbands() or image.info.get("transparency") is not None
    try:
        if has_alpha:  # transformers' convert_to_rgb: composite on opaque white
            rgba = image.convert("RGBA")
            white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
            rgb = Image.alpha_composite(white, rgba).convert("RGB")
        else:
            rgb = image.convert("RGB")
    except ValueError as e:
        raise ImageError(
            f"{name} has mode {image.mode}, which PIL cannot convert to RGB ({_short(e)}); "
            "convert it to RGB first"
        ) from None
    return np.asarray(rgb)


def _sixteen_bit_to_rgb(image: Image.Image) -> np.ndarray:
    """uint8 [H, W, 3] of a 16-bit gray image: the high byte of each value (negatives of signed modes -> 0).

    A `transparency` gray value (16-bit PNG tRNS) becomes white, as compositing on white would make it.
    """
    values = np.asarray(image).astype(np.int32)  # [H, W]
    gray = (np.clip(values, 0, 65535) >> 8).astype(np.uint8)
    transparent = image.info.get("transparency")
    if isinstance(transparent, int):
        gray[values == transparent] = 255
    return np.repeat(gray[:, :, None], 3, axis=2)


# ---- numpy arrays -------------------------------------------------------------------------------------------
def array_to_rgb(
    array: np.ndarray, *, color: str = "rgb", max_pixels: int = DEFAULT_MAX_PIXELS
) -> np.ndarray:
    """uint8 [H, W, 3] RGB of a channels-last uint8 array HxW, HxWx1, HxWx3 or HxWx4 (see the module docstring)."""
    _check_options(color, max_pixels)
    array = np.asarray(array)  # subclasses (np.matrix, masked arrays) as plain arrays
    shape = tuple(array.shape)
    if array.ndim not in (2, 3):
        raise ImageError(
            f"image array has shape {shape} ({array.ndim}-D); pass one image as HxW, HxWx3 or HxWx4 "
            "(channels last), e.g. batch[0] for a batch"
        )
    channels = 1 if array.ndim == 2 else shape[2]
    if channels not in (1, 3, 4):
        raise ImageError(
            f"image array has shape {shape}: {channels} channels; arrays are channels-last HxWx3 (RGB), "
            "HxWx4 (RGBA) or HxW (gray); for a CxHxW array pass arr.transpose(1, 2, 0)"
        )
    check_size(shape[1], shape[0], max_pixels)
    _check_dtype(array)

    if channels == 1:
        gray = array.reshape(shape[0], shape[1], 1)
        return np.ascontiguousarray(np.broadcast_to(gray, (shape[0], shape[1], 3)))
    if color == "bgr":
        array = array[:, :, [2, 1, 0, 3][:channels]]
    if channels == 4:
        return composite_on_white(array)
    return np.ascontiguousarray(array)


def _check_dtype(array: np.ndarray) -> None:
    dtype = array.dtype
    if dtype == np.uint8:
        return
    if dtype.kind in "fc" and np.isnan(array).any():
        raise ImageError(
            f"image array (dtype {dtype}) holds NaN values; replace them (np.nan_to_num) and pass uint8 0..255"
        )
    if dtype.kind == "b":
        fix = "arr.astype(np.uint8) * 255 for a mask"
    elif dtype.kind in "fc":
        fix = (
            "(arr * 255).round().astype(np.uint8) for values in [0, 1], "
            "or arr.clip(0, 255).round().astype(np.uint8) for values in [0, 255]"
        )
    elif dtype == np.uint16:
        fix = "(arr >> 8).astype(np.uint8) for 16-bit data"
    elif dtype.kind in "iu":
        fix = "arr.clip(0, 255).astype(np.uint8) if its values are 0..255"
    else:
        fix = "np.asarray(arr, dtype=np.uint8)"
    raise ImageError(f"image array has dtype {dtype}; pass uint8 values 0..255, e.g. {fix}")


def composite_on_white(rgba: np.ndarray) -> np.ndarray:
    """uint8 [H, W, 3]: uint8 [H, W, 4] RGBA composited on white, as transformers' numpy `convert_to_rgb`.

    transformers computes round(a/255 * c + (1 - a/255) * 255) in float64; the exact value is
    (a*c + (255-a)*255) / 255, never halfway between integers (255 is odd), so rounding it in integers,
    (n + 127) // 255, gives the same bytes. n + 127 <= 65152 fits uint16; row blocks of about a
    megapixel keep the temporaries small.
    """
    height, width = rgba.shape[:2]
    out = np.empty((height, width, 3), dtype=np.uint8)
    step = max(1, _BLOCK_PIXELS // width)
    for top in range(0, height, step):
        block = rgba[top : top + step]
        alpha = block[:, :, 3:4].astype(np.uint16)  # [h, W, 1]
        numerator = block[:, :, :3] * alpha  # uint16 [h, W, 3]
        numerator += (255 - alpha) * 255 + 127
        out[top : top + step] = numerator // 255
    return out
