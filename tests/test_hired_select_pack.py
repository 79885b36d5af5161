"""hired.select and hired.pack: top-k with ties to the lower index, no padding, and LlavaNext's packing order."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hired import (
    NEWLINE,
    AnyresLayout,
    BudgetPlan,
    HiredConfig,
    pack_tokens,
    plan_budget,
    select_tokens,
    top_k,
)
from tests.test_hired_layout import transformers_packed_ids

PINS = [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]
WIDE_PINS = [[336, 336], [336, 1344], [1344, 336], [672, 1008], [1008, 672], [1008, 1008]]


def layout(width: int, height: int, pins=PINS) -> AnyresLayout:
    return AnyresLayout.for_image(width=width, height=height, grid_pinpoints=pins)


SQUARE = layout(672, 672)  # 2x2, no padding
LANDSCAPE = layout(800, 600)  # 2x2, canvas rows 0-5 and 42-47 are padding


def empty_keep(grid_layout: AnyresLayout) -> list[np.ndarray]:
    return [np.zeros(0, dtype=np.int64) for _ in range(grid_layout.n_images)]


# --- top-k -------------------------------------------------------------------------------------------


def test_top_k_ties_go_to_the_lower_index():
    scores = np.array([1.0, 3.0, 3.0, 2.0, 3.0])
    assert top_k(scores, 2).tolist() == [1, 2]
    assert top_k(scores, 3).tolist() == [1, 2, 4]
    assert top_k(scores, 4).tolist() == [1, 2, 3, 4]
    assert top_k(np.zeros(6), 3).tolist() == [0, 1, 2]
    assert top_k(scores, 0).tolist() == []


def test_top_k_among_candidates_returns_sorted_original_indices():
    scores = np.array([9.0, 1.0, 5.0, 5.0, 7.0])
    assert top_k(scores, 2, np.array([1, 2, 3, 4])).tolist() == [2, 4]
    assert top_k(scores, 2, np.array([1, 2, 3])).tolist() == [2, 3]


# --- select ------------------------------------------------------------------------------------------


def test_select_keeps_each_images_top_tokens_in_raster_order():
    late = np.zeros((5, 576))
    late[0, [500, 3, 77]] = [3.0, 2.0, 1.0]
    late[2, [10, 20]] = [1.0, 5.0]
    plan = BudgetPlan(total=5, base=2, crops=(0, 3, 0, 0), distribution="spatial")
    keep = select_tokens(late, plan, SQUARE)
    assert keep[0].tolist() == [3, 500]
    assert keep[2].tolist() == [0, 10, 20]  # third place is a tie among zeros: the lowest index
    assert [k.size for k in keep] == [2, 0, 3, 0, 0]
    assert all(k.dtype == np.int64 for k in keep)


def test_spatial_selection_never_keeps_padding_even_when_it_scores_highest():
    late = np.ones((5, 576))
    late[1:, :144] = 100.0  # rows 0-5 of every crop: padding for crops 0 and 1
    plan = plan_budget(LANDSCAPE, np.ones(576), HiredConfig(rate=0.2))
    keep = select_tokens(late, plan, LANDSCAPE)
    assert [k.size for k in keep] == [plan.base, *plan.crops]
    for i in range(LANDSCAPE.n_crops):
        assert LANDSCAPE.valid_mask[i, keep[1 + i]].all()
    # crop 0 ranks its valid tokens (all tied at 1.0) from the lowest index; crop 2's top rows are valid
    assert keep[1].tolist() == list(range(144, 144 + plan.crops[0]))
    assert keep[3].tolist() == list(range(plan.crops[2]))


def test_official_selection_ranks_padding_and_then_drops_it():
    late = np.ones((5, 576), dtype=np.float32)
    late[1:, :144] = 100.0
    early = np.arange(576, 0, -1, dtype=np.float32)  # hot set = tokens 0..287 = bands 0 and 1
    plan = plan_budget(LANDSCAPE, early, HiredConfig(rate=0.2, distribution="official"))
    assert plan.crops == (144, 144, 0, 0)
    keep = select_tokens(late, plan, LANDSCAPE)
    # crops 0 and 1 spend their whole budget on their top padding rows, which are then removed
    assert [k.size for k in keep] == [288, 0, 0, 0, 0]


def test_stock_plan_selects_every_valid_token():
    plan = plan_budget(LANDSCAPE, np.ones(576), HiredConfig(rate=1.0, distribution="official"))
    keep = select_tokens(np.random.default_rng(0).random((5, 576)), plan, LANDSCAPE)
    assert keep[0].tolist() == list(range(576))
    for i in range(4):
        assert keep[1 + i].tolist() == np.flatnonzero(LANDSCAPE.valid_mask[i]).tolist()


@pytest.mark.parametrize(
    "late, message",
    [
        (np.ones((4, 576)), r"late_scores must have shape \[5, 576\]"),
        (np.ones((5, 575)), r"late_scores must have shape \[5, 576\]"),
        (np.where(np.eye(5, 576) > 0, np.nan, 1.0), "late_scores must be finite"),
        (np.where(np.eye(5, 576) > 0, -np.inf, 1.0), "late_scores must be finite"),
        (np.where(np.eye(5, 576) > 0, -0.5, 1.0), "late_scores must be >= 0"),
    ],
)
def test_bad_late_scores_raise_value_error(late, message):
    plan = plan_budget(SQUARE, np.ones(576), HiredConfig())
    with pytest.raises(ValueError, match=message):
        select_tokens(late, plan, SQUARE)


def test_a_plan_for_another_layout_is_refused():
    plan = plan_budget(layout(1008, 336), np.ones(576), HiredConfig())
    with pytest.raises(ValueError, match="3 crop budgets but the layout has 4 crops"):
        select_tokens(np.ones((5, 576)), plan, SQUARE)
    too_many = BudgetPlan(total=600, base=0, crops=(433, 0, 0, 0), distribution="spatial")
    with pytest.raises(ValueError, match=r"plan.crops\[0\] = 433 is outside \[0, 432\]"):
        select_tokens(np.ones((5, 576)), too_many, LANDSCAPE)


# --- pack --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "width, height, pins",
    [(672, 672, PINS), (800, 600, PINS), (600, 800, PINS), (401, 1000, PINS), (1, 4000, PINS), (4000, 1, PINS),
     (2000, 700, WIDE_PINS), (333, 1999, WIDE_PINS)],
)  # fmt: skip
@pytest.mark.parametrize("distribution, newlines", [("spatial", "none"), ("official", "rows")])
def test_rate_one_packs_exactly_like_llava_next(width, height, pins, distribution, newlines):
    grid_layout = layout(width, height, pins)
    cfg = HiredConfig(rate=1.0, distribution=distribution, newlines=newlines)
    plan = plan_budget(grid_layout, np.ones(576), cfg)
    keep = select_tokens(np.ones((grid_layout.n_images, 576)), plan, grid_layout)
    order = pack_tokens(keep, grid_layout, cfg)
    assert order.dtype == np.int64
    assert order.size == grid_layout.stock_tokens
    np.testing.assert_array_equal(order, transformers_packed_ids(width, height, pins, newline=True))


def test_crops_side_by_side_interleave_by_canvas_row():
    keep = empty_keep(SQUARE)
    keep[0] = np.array([5, 9])
    keep[1] = np.array([0, 1, 24])  # crop 0 (top-left): canvas (0,0), (0,1), (1,0)
    keep[2] = np.array([0])  # crop 1 (top-right): canvas (0,24)
    keep[3] = np.array([5])  # crop 2 (bottom-left): canvas (24,5)
    none = pack_tokens(keep, SQUARE, HiredConfig(newlines="none"))
    assert none.tolist() == [5, 9, 576, 577, 1152, 600, 1728 + 5]
    rows = pack_tokens(keep, SQUARE, HiredConfig(newlines="rows"))
    assert rows.tolist() == [5, 9, 576, 577, 1152, NEWLINE, 600, NEWLINE, 1728 + 5, NEWLINE]


def test_nothing_kept_in_the_crops_packs_only_the_base_tokens():
    keep = empty_keep(LANDSCAPE)
    keep[0] = np.arange(10, 20)
    for newlines in ("none", "rows"):
        assert pack_tokens(keep, LANDSCAPE, HiredConfig(newlines=newlines)).tolist() == list(range(10, 20))


@st.composite
def selections(draw):
    pins = draw(st.sampled_from([PINS, WIDE_PINS]))
    width, height = draw(st.integers(1, 4000)), draw(st.integers(1, 4000))
    rate = draw(st.floats(0.01, 0.99))
    alpha = draw(st.floats(0.0, 1.0))
    distribution = draw(st.sampled_from(["spatial", "official"]))
    newlines = draw(st.sampled_from(["none", "rows"]))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    grid_layout = layout(width, height, pins)
    early = rng.random(576).astype(np.float32)
    late = np.round(rng.random((grid_layout.n_images, 576)), 2).astype(np.float32)  # with ties
    cfg = HiredConfig(rate=rate, alpha=alpha, distribution=distribution, newlines=newlines)
    return grid_layout, early, late, cfg


@settings(max_examples=150, deadline=None, derandomize=True)
@given(selections())
def test_selected_tokens_are_valid_sorted_unique_and_packed_in_llava_next_order(case):
    grid_layout, early, late, cfg = case
    plan = plan_budget(grid_layout, early, cfg)
    keep = select_tokens(late, plan, grid_layout)
    assert len(keep) == grid_layout.n_images
    for image, indices in enumerate(keep):
        assert indices.dtype == np.int64
        assert np.all(np.diff(indices) > 0)
        assert indices.size == 0 or (indices[0] >= 0 and indices[-1] < 576)
        if image:
            assert grid_layout.valid_mask[image - 1, indices].all()
    kept = sum(k.size for k in keep)
    if cfg.distribution == "spatial":
        assert [k.size for k in keep] == [plan.base, *plan.crops]
        assert kept == min(plan.total, 576 + int(grid_layout.capacities.sum()))
    else:
        assert keep[0].size == plan.base
        assert all(k.size <= budget for k, budget in zip(keep[1:], plan.crops))
        assert kept <= plan.total

    order = pack_tokens(keep, grid_layout, cfg)
    patches = order[order != NEWLINE]
    assert patches.size == kept
    # the order is LlavaNext's own (base, then unpadded canvas raster) restricted to the kept tokens
    flat = np.zeros(grid_layout.n_images * 576, dtype=bool)
    for image, indices in enumerate(keep):
        flat[image * 576 + indices] = True
    reference = transformers_packed_ids(
        grid_layout.width, grid_layout.height, list(grid_layout.grid_pinpoints), False
    )
    np.testing.assert_array_equal(patches, reference[flat[reference]])
    rows_kept = int(flat[grid_layout.canvas_tokens].any(axis=1).sum())
    assert int((order == NEWLINE).sum()) == (rows_kept if cfg.newlines == "rows" else 0)
    if cfg.newlines == "rows" and patches.size > keep[0].size:
        assert order[-1] == NEWLINE


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda keep: keep[:-1], "keep must hold 5 index arrays"),
        (lambda keep: [keep[0][::-1], *keep[1:]], "sorted ascending"),
        (lambda keep: [np.array([3, 3]), *keep[1:]], "sorted ascending"),
        (lambda keep: [np.array([576]), *keep[1:]], r"outside \[0, 576\)"),
        (lambda keep: [np.array([0.5]), *keep[1:]], "1-D integer array"),
        (lambda keep: [*keep[:1], np.array([0]), *keep[2:]], "keep\\[1\\] holds padding token 0"),
    ],
)
def test_bad_keep_raises_value_error(mutate, message):
    keep = empty_keep(LANDSCAPE)
    keep[0] = np.array([1, 2, 3])
    with pytest.raises(ValueError, match=message):
        pack_tokens(mutate(keep), LANDSCAPE, HiredConfig())


def test_stock_packing_refuses_an_incomplete_selection():
    cfg = HiredConfig(rate=1.0)
    keep = select_tokens(np.ones((5, 576)), plan_budget(LANDSCAPE, np.ones(576), cfg), LANDSCAPE)
    keep[2] = keep[2][1:]
    with pytest.raises(ValueError, match="needs all 2304 valid tokens, got 2303"):
        pack_tokens(keep, LANDSCAPE, cfg)
