"""runtime.image.load_image: every supported input becomes the RGB transformers would see; bad input is refused."""

from __future__ import annotations

import io
import re
import struct
import time
import zlib

import numpy as np
import pytest
from PIL import Image, ImageFile
from transformers.image_transforms import convert_to_rgb
from transformers.image_utils import load_image as transformers_load_image

from runtime.errors import ImageError
from runtime.image import composite_on_white, format_pixels, load_image


# ---- helpers ------------------------------------------------------------------------------------------------
def _chunk(kind: bytes, data: bytes) -> bytes:
    return (
        struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
    )


def _png(width: int, height: int, *, depth: int = 8, color_type: int = 2, rows: bytes | None = None) -> bytes:
    """A hand-made PNG; without `rows` it has a header only (IHDR + IEND), which is all a size check needs."""
    ihdr = struct.pack(">IIBBBBB", width, height, depth, color_type, 0, 0, 0)
    idat = _chunk(b"IDAT", zlib.compress(rows)) if rows is not None else b""
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + idat + _chunk(b"IEND", b"")


def _encode(image: Image.Image, fmt: str = "PNG", **kw) -> bytes:
    buf = io.BytesIO()
    image.save(buf, fmt, **kw)
    return buf.getvalue()


def _rgb(height: int, width: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(height, width, 3), dtype=np.uint8)


def _refused(image, message: str, **kw) -> str:
    """Assert load_image raises a one-line ImageError matching `message`; return the text."""
    with pytest.raises(ImageError, match=message) as info:
        load_image(image, **kw)
    text = str(info.value)
    assert "\n" not in text
    return text


# ---- input kinds --------------------------------------------------------------------------------------------
def test_path_str_bytes_bytearray_memoryview_and_pil_give_the_same_pixels(tmp_path):
    rgb = _rgb(41, 67)
    path = tmp_path / "a.png"
    Image.fromarray(rgb).save(path)
    data = path.read_bytes()
    for image in (path, str(path), data, bytearray(data), memoryview(data), Image.fromarray(rgb), rgb):
        out = load_image(image)
        assert out.dtype == np.uint8 and out.shape == (41, 67, 3)
        np.testing.assert_array_equal(out, rgb)


def test_jpeg_decodes_like_pil_and_applies_exif_orientation_like_transformers(tmp_path):
    rgb = _rgb(20, 30, seed=1)
    plain = tmp_path / "plain.jpg"
    Image.fromarray(rgb).save(plain)
    np.testing.assert_array_equal(load_image(plain), np.asarray(Image.open(plain).convert("RGB")))
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90 degrees clockwise to display
    rotated = tmp_path / "rotated.jpg"
    Image.fromarray(rgb).save(rotated, exif=exif)
    out = load_image(rotated)
    assert out.shape == (30, 20, 3)
    np.testing.assert_array_equal(out, np.asarray(transformers_load_image(str(rotated))))


def test_gray_arrays_are_replicated_to_three_channels():
    gray = np.arange(12, dtype=np.uint8).reshape(3, 4) * 20
    for array in (gray, gray[:, :, None]):
        out = load_image(array)
        assert out.shape == (3, 4, 3)
        np.testing.assert_array_equal(out, np.asarray(Image.fromarray(gray).convert("RGB")))


def test_bgr_and_bgra_frames_are_swapped_to_rgb():
    rgb = _rgb(5, 7, seed=2)
    np.testing.assert_array_equal(load_image(rgb[:, :, ::-1], color="bgr"), rgb)
    rgba = np.dstack([rgb, np.random.default_rng(3).integers(0, 256, (5, 7), dtype=np.uint8)])
    bgra = rgba[:, :, [2, 1, 0, 3]]
    np.testing.assert_array_equal(load_image(bgra, color="bgr"), load_image(rgba))
    gray = rgb[:, :, 0]
    np.testing.assert_array_equal(load_image(gray, color="bgr"), load_image(gray))


def test_rgba_array_composites_on_white_exactly_as_transformers_for_every_value_and_alpha():
    value, alpha = np.meshgrid(np.arange(256, dtype=np.uint8), np.arange(256, dtype=np.uint8), indexing="ij")
    rgba = np.stack([value, 255 - value, value, alpha], axis=-1)  # [256, 256, 4]: all 65536 pairs
    expected = convert_to_rgb(rgba, return_numpy=True, input_data_format="channels_last")
    np.testing.assert_array_equal(composite_on_white(rgba), expected)
    np.testing.assert_array_equal(load_image(rgba), expected)
    assert (load_image(rgba)[value == 0][:, 0] == 255 - alpha[value == 0]).all()  # black on white, fading


def _pil_modes() -> dict[str, Image.Image]:
    base = Image.fromarray(np.random.default_rng(4).integers(0, 256, (13, 17, 4), dtype=np.uint8), "RGBA")
    modes = {
        m: base.convert(m) for m in ("RGBA", "LA", "RGBa", "P", "PA", "L", "1", "CMYK", "YCbCr", "I", "F")
    }
    modes["RGBX"] = base.convert("RGBX")
    palette_t = base.convert("RGB").convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    palette_t.info["transparency"] = 3
    modes["P+transparency"] = palette_t
    gray_t = base.convert("L")
    gray_t.info["transparency"] = int(np.asarray(gray_t)[0, 0])
    modes["L+transparency"] = gray_t
    return modes


@pytest.mark.parametrize("name", list(_pil_modes()))
def test_pil_modes_convert_exactly_as_transformers_convert_to_rgb(name):
    image = _pil_modes()[name]
    np.testing.assert_array_equal(load_image(image), convert_to_rgb(image, return_numpy=True))


def test_palette_cmyk_and_one_bit_files_load_like_transformers(tmp_path):
    base = Image.fromarray(_rgb(19, 23, seed=5))
    files = {
        "p.png": base.convert("P", palette=Image.Palette.ADAPTIVE, colors=8),
        "p.gif": base.convert("P", palette=Image.Palette.ADAPTIVE, colors=8),
        "cmyk.jpg": base.convert("CMYK"),
        "cmyk.tif": base.convert("CMYK"),
        "one.png": base.convert("1"),
        "la.png": base.convert("LA"),
    }
    for name, image in files.items():
        path = tmp_path / name
        image.save(path)
        reopened = Image.open(path)
        assert reopened.mode == image.mode, name
        out = load_image(path)
        np.testing.assert_array_equal(out, convert_to_rgb(Image.open(path), return_numpy=True), err_msg=name)
    assert set(np.unique(load_image(tmp_path / "one.png"))) <= {0, 255}


def test_sixteen_bit_pngs_keep_their_high_byte_gray_and_rgb():
    values = np.array([[0, 255, 256, 1000], [40000, 65280, 65535, 12345]], dtype=">u2")  # [2, 4]
    gray_png = _encode(Image.fromarray(values.astype(np.uint16)))
    assert Image.open(io.BytesIO(gray_png)).mode == "I;16"
    np.testing.assert_array_equal(
        load_image(gray_png), np.repeat((values >> 8).astype(np.uint8)[:, :, None], 3, 2)
    )

    rgb16 = np.stack([values, values[::-1], 65535 - values], axis=-1).astype(">u2")  # [2, 4, 3]
    rows = b"".join(b"\0" + row.tobytes() for row in rgb16)
    out = load_image(_png(4, 2, depth=16, color_type=2, rows=rows))
    np.testing.assert_array_equal(out, (rgb16 >> 8).astype(np.uint8))


@pytest.mark.parametrize("height,width", [(1, 4000), (4000, 1), (1, 1)])
def test_extreme_aspect_ratios_load_from_arrays_and_files(height, width):
    rgb = _rgb(height, width, seed=6)
    np.testing.assert_array_equal(load_image(rgb), rgb)
    np.testing.assert_array_equal(load_image(_encode(Image.fromarray(rgb))), rgb)


def test_max_pixels_is_inclusive_for_arrays_files_and_pil():
    rgb = _rgb(10, 12, seed=7)
    for image in (rgb, _encode(Image.fromarray(rgb)), Image.fromarray(rgb)):
        assert load_image(image, max_pixels=120).shape == (10, 12, 3)
        _refused(image, r"^image is 12x10 = 120 px, over the 119 px limit; resize it or raise Pipeline\(max_pixels=",
                 max_pixels=119)  # fmt: skip


def test_pils_own_decompression_bomb_limit_is_replaced_by_max_pixels(monkeypatch):
    """With PIL's limit far below the image, Image.open would refuse it; load_image obeys max_pixels only."""
    data = _encode(Image.fromarray(_rgb(30, 40, seed=8)))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)
    with pytest.raises(Image.DecompressionBombError):
        Image.open(io.BytesIO(data))
    assert load_image(data).shape == (30, 40, 3)
    _refused(data, r"image is 40x30 = 1\.2 kpx, over the 1\.1 kpx limit", max_pixels=1100)


def test_contiguous_rgb_array_is_not_copied_and_strided_views_work():
    rgb = _rgb(8, 9, seed=9)
    assert load_image(rgb) is rgb
    view = np.asarray(Image.fromarray(_rgb(16, 18, seed=10)))[::2, ::2]
    out = load_image(view)
    assert out.flags.c_contiguous
    np.testing.assert_array_equal(out, view)


# ---- refusals -----------------------------------------------------------------------------------------------
def test_huge_png_header_is_refused_from_the_header_without_decoding():
    data = _png(50000, 50000)  # 59 bytes whose IHDR claims 2.5 gigapixels
    start = time.perf_counter()
    _refused(
        data,
        r"^image is 50000x50000 = 2\.5 Gpx, over the 64 Mpx limit; resize it or raise Pipeline\(max_pixels=\.\.\.\)$",
    )
    assert time.perf_counter() - start < 1.0
    assert Image.MAX_IMAGE_PIXELS == int(1024 * 1024 * 1024 // 4 // 3)  # PIL's global limit left alone


def test_huge_png_header_in_a_file_is_refused(tmp_path):
    path = tmp_path / "bomb.png"
    path.write_bytes(_png(30000, 3000, rows=b"\0" * 64))
    _refused(path, r"^image is 30000x3000 = 90 Mpx, over the 64 Mpx limit")


@pytest.mark.parametrize(
    "image,message",
    [
        (
            np.zeros((0, 0, 3), np.uint8),
            r"^image is 0x0 pixels \(width x height\); pass an image with both sides >= 1",
        ),
        (np.zeros((5, 0), np.uint8), r"^image is 0x5 pixels"),
        (np.zeros((0, 7, 4), np.uint8), r"^image is 7x0 pixels"),
        (_png(0, 0), r"^image is 0x0 pixels"),
        (_png(3, 0), r"^image is 3x0 pixels"),
    ],
    ids=["array-0x0", "array-0x5", "array-7x0", "png-0x0", "png-3x0"],
)
def test_empty_images_are_refused(image, message):
    _refused(image, message)


def test_missing_file_and_directory_are_named(tmp_path):
    missing = tmp_path / "nope" / "cat.png"
    text = _refused(missing, r"^image file not found: .*cat\.png; check the path$")
    assert str(missing) in text
    _refused(tmp_path, r"is a directory, not an image file")
    _refused(str(missing), r"^image file not found")


@pytest.mark.parametrize(
    "data,message",
    [
        (b"", r"^image data \(0 bytes\) is empty; pass a PNG, JPEG"),
        (
            b"this is not an image at all" * 3,
            r"^image data \(81 bytes\) is not a readable image \(unknown format",
        ),
        (b"\x89PNG\r\n\x1a\n" + b"\0" * 40, r"is not a readable image"),
    ],
    ids=["empty", "text", "png-signature-only"],
)
def test_garbage_bytes_are_refused(data, message):
    _refused(data, message)


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP", "GIF", "BMP", "TIFF"])
def test_truncated_files_are_refused_not_loaded_partially(fmt):
    image = Image.fromarray(_rgb(120, 160, seed=11))
    data = _encode(image, fmt)
    assert load_image(data).shape == (120, 160, 3)
    _refused(
        data[: len(data) // 2],
        r"^image data \(\d+ bytes\) is truncated or corrupt \(OSError: .*\); re-save or re-download it$",
    )
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False


def test_truncated_file_opened_lazily_by_the_caller_is_refused():
    data = _encode(Image.fromarray(_rgb(100, 100, seed=12)))
    lazy = Image.open(io.BytesIO(data[: len(data) // 2]))
    _refused(lazy, r"^the PIL image could not be loaded \(OSError: image file is truncated")


@pytest.mark.parametrize(
    "array,message",
    [
        (
            np.zeros((4, 5, 2), np.uint8),
            r"^image array has shape \(4, 5, 2\): 2 channels; arrays are channels-last",
        ),
        (np.zeros((4, 5, 5), np.uint8), r"^image array has shape \(4, 5, 5\): 5 channels"),
        (np.zeros((3, 40, 50), np.uint8), r"50 channels.*for a CxHxW array pass arr\.transpose\(1, 2, 0\)$"),
        (np.zeros((2, 4, 5, 3), np.uint8), r"^image array has shape \(2, 4, 5, 3\) \(4-D\); pass one image"),
        (np.zeros(10, np.uint8), r"^image array has shape \(10,\) \(1-D\)"),
    ],
    ids=["2-channels", "5-channels", "channels-first", "4-D", "1-D"],
)
def test_wrong_shapes_are_refused_never_guessed(array, message):
    _refused(array, message)


@pytest.mark.parametrize(
    "array,message",
    [
        (
            np.zeros((4, 5, 3), np.uint16),
            r"^image array has dtype uint16; pass uint8 values 0\.\.255, e\.g\. \(arr >> 8\)",
        ),
        (np.zeros((4, 5, 3), np.float32), r"^image array has dtype float32; .*\(arr \* 255\)\.round\(\)"),
        (np.ones((4, 5), np.float64), r"^image array has dtype float64"),
        (np.zeros((4, 5), bool), r"^image array has dtype bool; .*arr\.astype\(np\.uint8\) \* 255"),
        (np.zeros((4, 5, 3), np.int64), r"^image array has dtype int64; .*clip\(0, 255\)"),
        (
            np.full((4, 5, 3), np.nan, np.float32),
            r"^image array \(dtype float32\) holds NaN values; replace them",
        ),
    ],
    ids=["uint16", "float32", "float64", "bool", "int64", "nan"],
)
def test_wrong_dtypes_are_refused_with_the_conversion_to_use(array, message):
    _refused(array, message)


def test_bad_options_and_types_are_refused(tmp_path):
    rgb = _rgb(3, 3)
    _refused(rgb, r"^color must be 'rgb' or 'bgr', got 'BGR'$", color="BGR")
    path = tmp_path / "a.png"
    Image.fromarray(rgb).save(path)
    _refused(path, r"^color='bgr' applies to numpy arrays \(camera frames\) only", color="bgr")
    _refused(rgb, r"^max_pixels must be a positive integer, got 0$", max_pixels=0)
    _refused([[1, 2, 3]], r"^unsupported image type builtins\.list; pass a file path, encoded bytes")
    _refused("https://example.com/cat.png", r"is a URL, which the runtime does not fetch")


def test_size_just_over_the_limit_prints_exact_counts():
    _refused(
        np.zeros((1001, 1000), np.uint8), r"= 1,001,000 px, over the 1,000,999 px limit", max_pixels=1_000_999
    )


def test_pixel_counts_read_naturally():
    assert [format_pixels(n) for n in (7, 1200, 64_000_000, 2_500_000_000)] == [
        "7 px",
        "1.2 kpx",
        "64 Mpx",
        "2.5 Gpx",
    ]
    assert re.fullmatch(r"\d+ px", format_pixels(999))
