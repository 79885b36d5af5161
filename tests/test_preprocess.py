"""runtime.preprocess equals transformers' LlavaNextImageProcessorPil (LLaVA-NeXT settings) for every image size."""

from __future__ import annotations

import dataclasses
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image
from transformers import LlavaNextImageProcessorPil

from runtime.errors import BundleError, ImageError
from runtime.image import load_image
from runtime.manifest import ImageProcessorSpec
from runtime.preprocess import Preprocessed, center_crop, preprocess

PINPOINTS = [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
TOL = 1e-5

# (width, height)
TABLE = [
    (1, 1), (1, 4000), (4000, 1), (17, 913), (913, 17), (336, 336), (500, 400), (400, 500),
    (640, 480), (480, 640), (1024, 768), (1920, 1080), (1080, 1920), (337, 1009), (1009, 337),
]  # fmt: skip


def _random_sizes(count: int, seed: int = 1234) -> list[tuple[int, int]]:
    """Seeded (width, height) pairs, log-uniform in 1..2500 px per side."""
    rng = np.random.default_rng(seed)
    sides = np.exp(rng.uniform(0.0, np.log(2500.0), size=(count, 2))).astype(int)
    return [(int(w), int(h)) for w, h in np.maximum(sides, 1)]


def _processor(
    shortest_edge: int = 336, resample: int = Image.Resampling.BICUBIC, **kw
) -> LlavaNextImageProcessorPil:
    return LlavaNextImageProcessorPil(
        size={"shortest_edge": shortest_edge},
        crop_size={"height": 336, "width": 336},
        image_grid_pinpoints=kw.pop("pinpoints", PINPOINTS),
        resample=resample,
        **kw,
    )


def _spec(shortest_edge: int = 336, resample: str = "bicubic", **kw) -> ImageProcessorSpec:
    return ImageProcessorSpec(
        crop_size=336,
        shortest_edge=shortest_edge,
        grid_pinpoints=tuple(tuple(p) for p in kw.pop("pinpoints", PINPOINTS)),
        image_mean=kw.pop("image_mean", CLIP_MEAN),
        image_std=kw.pop("image_std", CLIP_STD),
        rescale_factor=1 / 255,
        resample=resample,
    )


@pytest.fixture(scope="module")
def processor() -> LlavaNextImageProcessorPil:
    return _processor()


@pytest.fixture(scope="module")
def spec() -> ImageProcessorSpec:
    return _spec()


def _reference(processor, image) -> np.ndarray:
    return processor(image, return_tensors="np")["pixel_values"][0]


def _random_rgb(width: int, height: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(height, width, 3), dtype=np.uint8)


def _assert_parity(ours: Preprocessed, ref: np.ndarray, width: int, height: int) -> None:
    assert ours.pixel_values.dtype == np.float32
    assert ours.pixel_values.shape == ref.shape
    assert ours.pixel_values.shape == (1 + ours.layout.n_crops, 3, 336, 336)
    assert ours.image_size == (height, width)
    assert float(np.abs(ours.pixel_values - ref).max()) <= TOL


def test_default_processor_is_llava_next(processor):
    """Guard: the reference really is CLIP-normalised, bicubic, 336 px (else the parity tests prove little)."""
    assert tuple(processor.image_mean) == CLIP_MEAN and tuple(processor.image_std) == CLIP_STD
    assert processor.resample == Image.Resampling.BICUBIC and processor.rescale_factor == 1 / 255
    assert processor.size["shortest_edge"] == 336 and processor.crop_size["height"] == 336


@pytest.mark.parametrize("width,height", TABLE, ids=[f"{w}x{h}" for w, h in TABLE])
def test_pixel_values_equal_transformers_on_size_table(processor, spec, width, height):
    rgb = _random_rgb(width, height, seed=width * 7919 + height)
    _assert_parity(preprocess(rgb, spec), _reference(processor, Image.fromarray(rgb)), width, height)


@pytest.mark.parametrize("width,height", _random_sizes(30), ids=lambda v: str(v))
def test_pixel_values_equal_transformers_on_random_sizes(processor, spec, width, height):
    rgb = _random_rgb(width, height, seed=width * 31 + height)
    _assert_parity(preprocess(rgb, spec), _reference(processor, Image.fromarray(rgb)), width, height)


@pytest.mark.parametrize(
    "shortest_edge,resample,pil_resample",
    [
        (384, "bicubic", Image.Resampling.BICUBIC),  # crops resized up to 384, then centre-cropped to 336
        (300, "bilinear", Image.Resampling.BILINEAR),  # crops resized down to 300, then zero-padded to 336
        (336, "nearest", Image.Resampling.NEAREST),
    ],
)
def test_pixel_values_equal_transformers_with_other_processor_settings(shortest_edge, resample, pil_resample):
    mean, std = (0.5, 0.4, 0.3), (0.2, 0.3, 0.25)
    pins = [[336, 672], [672, 336], [672, 672]]
    proc = _processor(shortest_edge, pil_resample, image_mean=list(mean), image_std=list(std), pinpoints=pins)
    spec = _spec(shortest_edge, resample, image_mean=mean, image_std=std, pinpoints=pins)
    for width, height in [(733, 451), (200, 900), (5, 3)]:
        rgb = _random_rgb(width, height, seed=shortest_edge + width)
        _assert_parity(preprocess(rgb, spec), _reference(proc, Image.fromarray(rgb)), width, height)


def test_crops_follow_the_base_image_in_row_major_order(spec):
    """672x672 hits the (672, 672) pinpoint without resizing: each crop is exactly one solid quadrant."""
    colours = np.array([[10, 20, 30], [40, 50, 60], [70, 80, 90], [200, 210, 220]], dtype=np.uint8)
    rgb = np.zeros((672, 672, 3), dtype=np.uint8)
    for i, (r, c) in enumerate([(0, 0), (0, 1), (1, 0), (1, 1)]):
        rgb[r * 336 : (r + 1) * 336, c * 336 : (c + 1) * 336] = colours[i]
    pre = preprocess(rgb, spec)
    assert pre.layout.grid == (2, 2) and pre.pixel_values.shape == (5, 3, 336, 336)
    expected = (colours / np.float32(255) - np.float32(CLIP_MEAN)) / np.float32(CLIP_STD)  # [4, 3]
    crops = pre.pixel_values[1:]
    assert np.allclose(crops, expected[:, :, None, None], atol=1e-6)


def test_padding_is_black_before_normalisation_and_centred(spec):
    """A white 1000x200 (w x h) image: canvas 1008x336, resized to 1008x202, pasted 67 rows down."""
    pre = preprocess(np.full((200, 1000, 3), 255, dtype=np.uint8), spec)
    layout = pre.layout
    assert layout.best_resolution == (336, 1008) and layout.resized == (202, 1008) and layout.pad == (67, 0)
    pad_value = -np.float32(CLIP_MEAN) / np.float32(CLIP_STD)
    white = (1 - np.float32(CLIP_MEAN)) / np.float32(CLIP_STD)
    crops = pre.pixel_values[1:]  # [3, 3, 336, 336]
    assert np.allclose(crops[:, :, :67, :], pad_value[None, :, None, None], atol=1e-6)
    assert np.allclose(crops[:, :, 67 + 202 :, :], pad_value[None, :, None, None], atol=1e-6)
    assert np.allclose(crops[:, :, 68:268, :], white[None, :, None, None], atol=1e-6)
    assert np.allclose(pre.pixel_values[0], white[:, None, None], atol=1e-6)  # base: squashed, no padding


def test_input_kinds_give_the_pixel_values_transformers_gives_for_the_same_image(processor, spec, tmp_path):
    rgb = _random_rgb(123, 77, seed=5)
    ref = _reference(processor, Image.fromarray(rgb))
    path = tmp_path / "img.png"
    Image.fromarray(rgb).save(path)
    for image in (rgb, Image.fromarray(rgb), path, str(path), path.read_bytes(), rgb[:, :, ::-1].copy()):
        color = "bgr" if isinstance(image, np.ndarray) and not np.array_equal(image, rgb) else "rgb"
        _assert_parity(preprocess(load_image(image, color=color), spec), ref, 123, 77)


def test_rgba_equals_transformers_on_the_same_pil_image_and_array(processor, spec):
    rgba = np.random.default_rng(9).integers(0, 256, size=(61, 97, 4), dtype=np.uint8)
    pil = Image.fromarray(rgba, mode="RGBA")
    _assert_parity(preprocess(load_image(pil), spec), _reference(processor, pil), 97, 61)
    _assert_parity(preprocess(load_image(rgba), spec), _reference(processor, rgba), 97, 61)


def test_center_crop_pads_and_crops_like_transformers():
    from transformers.image_transforms import center_crop as tf_center_crop

    rng = np.random.default_rng(3)
    for h, w, size in [(10, 10, 6), (5, 9, 8), (7, 7, 12), (12, 3, 5), (6, 6, 6)]:
        image = rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)
        ref = tf_center_crop(image, (size, size), input_data_format="channels_last")
        np.testing.assert_array_equal(center_crop(image, size), ref)


@pytest.mark.parametrize(
    "bad,message",
    [
        (np.zeros((4, 5), dtype=np.uint8), r"uint8 \[H, W, 3\] RGB array, got uint8 array of shape \(4, 5\)"),
        (
            np.zeros((4, 5, 3), dtype=np.float32),
            r"got float32 array of shape \(4, 5, 3\); pass it through load_image",
        ),
        (np.zeros((4, 5, 4), dtype=np.uint8), r"got uint8 array of shape \(4, 5, 4\)"),
        (np.zeros((0, 5, 3), dtype=np.uint8), r"image is 5x0 pixels"),
        ([[1, 2, 3]], r"got list"),
    ],
)
def test_preprocess_refuses_anything_but_uint8_rgb(spec, bad, message):
    with pytest.raises(ImageError, match=message):
        preprocess(bad, spec)


def test_bad_processor_settings_are_bundle_errors(spec):
    rgb = _random_rgb(20, 10, seed=0)
    with pytest.raises(
        BundleError, match=r"unknown resample 'cubic'.*expected one of nearest, bilinear, bicubic"
    ):
        preprocess(rgb, dataclasses.replace(spec, resample="cubic"))
    with pytest.raises(
        BundleError, match=r"image processor settings are invalid: .*not a multiple of crop_size 336"
    ):
        preprocess(rgb, dataclasses.replace(spec, grid_pinpoints=((336, 600),)))
    with pytest.raises(BundleError, match=r"std non-zero"):
        preprocess(rgb, dataclasses.replace(spec, image_std=(0.2, 0.0, 0.2)))


def test_image_modules_never_import_torch_or_transformers():
    code = (
        "import sys, runtime.image, runtime.preprocess\n"
        "bad = [m for m in ('torch', 'transformers') if m in sys.modules]\n"
        "assert not bad, bad\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
