"""hired.layout agrees with transformers' LlavaNext geometry for every image size, and its hand-worked cases."""

from __future__ import annotations

import functools
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st
from transformers.image_processing_utils import get_patch_output_size, select_best_resolution
from transformers.image_utils import ChannelDimension
from transformers.models.llava_next.modeling_llava_next import (
    LlavaNextModel,
    image_size_to_num_patches,
    unpad_image,
)
from transformers.models.llava_next.processing_llava_next import LlavaNextProcessor

from hired import AnyresLayout

LLAVA_NEXT_PINS = [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]
WIDE_PINS = [
    [336, 336],
    [336, 1344],
    [1344, 336],
    [672, 1008],
    [1008, 672],
    [1008, 1008],
    [336, 672],
    [672, 336],
]
CROP, PATCH = 336, 14
SIDE = CROP // PATCH
REPO = Path(__file__).resolve().parents[1]

sizes = st.integers(min_value=1, max_value=10_000)
EXTREMES = [(1, 1), (1, 4000), (4000, 1), (1, 10_000), (10_000, 1), (10_000, 10_000), (336, 336), (401, 1000)]


def transformers_packed_ids(width: int, height: int, pins: list, newline: bool) -> np.ndarray:
    """LlavaNext's own pack_image_features on features that carry their id image*576 + token (newline = -1)."""
    n = image_size_to_num_patches((height, width), pins, CROP)
    ids = torch.arange(n * SIDE * SIDE, dtype=torch.float64).reshape(n, SIDE * SIDE, 1)
    model = SimpleNamespace(
        config=SimpleNamespace(
            vision_config=SimpleNamespace(image_size=CROP, patch_size=PATCH), image_grid_pinpoints=pins
        )
    )
    packed, lens = LlavaNextModel.pack_image_features(
        model,
        [ids],
        torch.tensor([[height, width]]),
        "default",
        image_newline=torch.tensor([-1.0], dtype=torch.float64) if newline else None,
    )
    out = packed[0][:, 0].numpy().astype(np.int64)
    assert int(lens[0]) == out.size
    return out


def transformers_stock_count(width: int, height: int, pins: list) -> int:
    """LlavaNextProcessor's count of <image> tokens for one image (the "default" strategy drops the CLS one)."""
    proc = SimpleNamespace(
        image_processor=SimpleNamespace(image_grid_pinpoints=pins),
        patch_size=PATCH,
        num_additional_image_tokens=1,
    )
    proc._get_unpadded_features = functools.partial(LlavaNextProcessor._get_unpadded_features, proc)
    return LlavaNextProcessor._get_number_of_features(proc, height, width, CROP, CROP) - 1


def assert_matches_transformers(width: int, height: int, pins: list) -> None:
    layout = AnyresLayout.for_image(
        width=width, height=height, grid_pinpoints=pins, crop_size=CROP, patch_size=PATCH
    )
    where = f"image {width}x{height} (w x h), pins {pins}"
    best = tuple(select_best_resolution((height, width), pins))
    assert layout.best_resolution == best, where
    image = np.broadcast_to(np.zeros((1, 1, 1), np.uint8), (3, height, width))
    resized = tuple(get_patch_output_size(image, best, ChannelDimension.FIRST))
    assert layout.resized == resized, where
    assert layout.pad == ((best[0] - resized[0]) // 2, (best[1] - resized[1]) // 2), where
    assert layout.grid == (best[0] // CROP, best[1] // CROP), where
    assert layout.n_crops == layout.grid[0] * layout.grid[1]
    canvas = torch.zeros(1, layout.grid[0] * SIDE, layout.grid[1] * SIDE)
    unpadded = unpad_image(canvas, torch.tensor([height, width]))
    assert (layout.unpadded_rows, layout.unpadded_cols) == tuple(unpadded.shape[1:]), where

    packed = transformers_packed_ids(width, height, pins, newline=False)
    np.testing.assert_array_equal(packed[: SIDE * SIDE], np.arange(SIDE * SIDE), err_msg=where)
    np.testing.assert_array_equal(layout.canvas_tokens.reshape(-1), packed[SIDE * SIDE :], err_msg=where)
    valid = np.zeros(layout.n_images * SIDE * SIDE, dtype=bool)
    valid[packed[SIDE * SIDE :]] = True
    np.testing.assert_array_equal(layout.valid_mask, valid.reshape(-1, SIDE * SIDE)[1:], err_msg=where)
    np.testing.assert_array_equal(layout.capacities, layout.valid_mask.sum(1), err_msg=where)
    assert layout.stock_tokens == transformers_stock_count(width, height, pins), where
    assert layout.stock_tokens == transformers_packed_ids(width, height, pins, newline=True).size, where


@settings(max_examples=300, deadline=None, derandomize=True)
@given(width=sizes, height=sizes)
@example(width=1, height=4000)
@example(width=4000, height=1)
@example(width=401, height=1000)
def test_layout_matches_transformers_for_llava_next_pinpoints(width, height):
    assert_matches_transformers(width, height, LLAVA_NEXT_PINS)


@settings(max_examples=100, deadline=None, derandomize=True)
@given(width=sizes, height=sizes)
def test_layout_matches_transformers_for_larger_grids(width, height):
    assert_matches_transformers(width, height, WIDE_PINS)


@pytest.mark.parametrize("width, height", EXTREMES)
def test_layout_matches_transformers_at_extreme_sizes(width, height):
    assert_matches_transformers(width, height, LLAVA_NEXT_PINS)


def test_stock_count_of_800x600_is_2340():
    layout = AnyresLayout.for_image(width=800, height=600, grid_pinpoints=LLAVA_NEXT_PINS)
    assert layout.grid == (2, 2)
    assert layout.stock_tokens == 2340


def test_tall_image_pads_top_and_bottom_and_maps_base_rows_7_10_7():
    layout = AnyresLayout.for_image(width=400, height=1000, grid_pinpoints=LLAVA_NEXT_PINS)
    assert layout.best_resolution == (1008, 336)
    assert layout.resized == (840, 336)
    assert layout.pad == (84, 0)
    assert layout.grid == (3, 1)
    assert layout.tokens_per_image == 576 and layout.side == 24 and layout.n_images == 4
    # token canvas 72x24: the image covers 60 rows, 6 padding rows at each end
    assert (layout.unpadded_rows, layout.unpadded_cols) == (60, 24)
    assert layout.capacities.tolist() == [432, 576, 432]
    assert layout.stock_tokens == 576 + 60 * 25
    # base row r has its centre at y = 84 + (r + 0.5) * 35: crop boundaries 336 and 672 fall after rows 6, 16
    per_row = layout.base_to_crop.reshape(24, 24)
    assert (per_row == per_row[:, :1]).all()
    assert per_row[:, 0].tolist() == [0] * 7 + [1] * 10 + [2] * 7


def test_odd_unpad_slack_keeps_one_row_more_than_the_image():
    # 1000 * 24 / 401 = 59.85 -> 59 rows of image; slack 13 -> 6 cut from each end -> 60 rows kept
    layout = AnyresLayout.for_image(width=401, height=1000, grid_pinpoints=LLAVA_NEXT_PINS)
    assert layout.grid == (3, 1)
    assert layout.unpadded_rows == 60


def test_square_image_maps_base_quadrants_to_crops():
    layout = AnyresLayout.for_image(width=672, height=672, grid_pinpoints=LLAVA_NEXT_PINS)
    assert layout.grid == (2, 2) and layout.pad == (0, 0)
    quadrants = np.block(
        [[np.full((12, 12), 0), np.full((12, 12), 1)], [np.full((12, 12), 2), np.full((12, 12), 3)]]
    )
    np.testing.assert_array_equal(layout.base_to_crop.reshape(24, 24), quadrants)
    assert layout.capacities.tolist() == [576] * 4


def test_side_by_side_crops_map_base_columns():
    layout = AnyresLayout.for_image(width=1000, height=500, grid_pinpoints=LLAVA_NEXT_PINS)
    assert layout.grid == (1, 2)
    per_col = layout.base_to_crop.reshape(24, 24)
    assert per_col[0].tolist() == [0] * 12 + [1] * 12
    assert (per_col == per_col[:1]).all()


def test_a_one_pixel_wide_image_has_no_crop_tokens_left_after_unpadding():
    layout = AnyresLayout.for_image(width=1, height=4000, grid_pinpoints=LLAVA_NEXT_PINS)
    assert layout.capacities.tolist() == [0, 0]
    assert layout.unpadded_cols == 0 and layout.stock_tokens == 576 + 24
    assert layout.canvas_tokens.shape == (24, 0)


def test_base_tokens_all_map_inside_the_grid():
    for width, height in [(1, 1), (4000, 1), (333, 999), (2000, 700)]:
        layout = AnyresLayout.for_image(width=width, height=height, grid_pinpoints=WIDE_PINS)
        assert layout.base_to_crop.shape == (576,)
        assert 0 <= layout.base_to_crop.min() and layout.base_to_crop.max() < layout.n_crops


def test_layout_arrays_are_read_only():
    layout = AnyresLayout.for_image(width=800, height=600, grid_pinpoints=LLAVA_NEXT_PINS)
    with pytest.raises(ValueError):
        layout.valid_mask[0, 0] = False


def test_layouts_of_the_same_image_are_equal_and_hashable():
    a = AnyresLayout.for_image(width=800, height=600, grid_pinpoints=LLAVA_NEXT_PINS)
    b = AnyresLayout.for_image(width=800, height=600, grid_pinpoints=[tuple(p) for p in LLAVA_NEXT_PINS])
    assert a == b and hash(a) == hash(b)
    assert a != AnyresLayout.for_image(width=600, height=800, grid_pinpoints=LLAVA_NEXT_PINS)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(width=0, height=10), "image width"),
        (dict(width=10, height=-3), "image height"),
        (dict(width=10.5, height=10), "image width"),
        (dict(width=True, height=10), "image width"),
        (dict(width=10, height=10, grid_pinpoints="336x672"), "grid_pinpoints"),
        (dict(width=10, height=10, grid_pinpoints=[[336, 700]]), "multiple of crop_size"),
        (dict(width=10, height=10, grid_pinpoints=[[336]]), "(height, width) pair"),
        (dict(width=10, height=10, crop_size=330), "multiple of patch_size"),
    ],
)
def test_bad_sizes_raise_value_error_naming_the_problem(kwargs, message):
    kwargs.setdefault("grid_pinpoints", LLAVA_NEXT_PINS)
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        AnyresLayout.for_image(**kwargs)


@pytest.mark.parametrize("width, height, resized", [(1300, 380, (336, 1149)), (450, 1000, (746, 336)), (336, 336, (336, 336))])
def test_no_pinpoints_is_one_partition_the_centre_crop_of_the_shortest_edge_resize(width, height, resized):
    """LLaVA-1.5: CLIPImageProcessor's resize (shortest edge 336, long side truncated) and centre crop."""
    layout = AnyresLayout.for_image(width=width, height=height, grid_pinpoints=[])
    assert layout.single and layout.grid == (0, 0) and layout.n_crops == 0 and layout.n_images == 1
    assert layout.resized == resized and layout.pad == ((resized[0] - 336) // 2, (resized[1] - 336) // 2)
    assert layout.stock_tokens == 576 and layout.unpadded_rows == 0 and layout.capacities.shape == (0,)
    assert layout.valid_mask.shape == (0, 576) and layout.canvas_tokens.shape == (0, 0)


def test_for_image_takes_keywords_only():
    with pytest.raises(TypeError):
        AnyresLayout.for_image(800, 600, LLAVA_NEXT_PINS)  # type: ignore[misc]


def test_importing_hired_loads_neither_torch_nor_transformers():
    code = "import sys, hired; print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO)
    assert out.stdout.strip() == "[]", out.stderr
