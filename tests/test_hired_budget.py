"""hired.config and hired.budget: exact spatial budgets, the official code's split, and their hand-worked cases."""

from __future__ import annotations

from fractions import Fraction

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hired import AnyresLayout, BudgetPlan, HiredConfig, plan_budget
from hired.budget import largest_remainder, spatial_split, water_fill

PINS = [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]
WIDE_PINS = [[336, 336], [336, 1344], [1344, 336], [672, 1008], [1008, 672], [1008, 1008]]
FIVE_CROPS = [[336, 1680]]


def layout(width: int, height: int, pins=PINS) -> AnyresLayout:
    return AnyresLayout.for_image(width=width, height=height, grid_pinpoints=pins)


SQUARE = layout(672, 672)  # 2x2 grid, no padding
ROW_OF_3 = layout(1008, 336)  # 1x3 grid
COLUMN_OF_3 = layout(336, 1008)  # 3x1 grid
ROW_OF_2 = layout(672, 336)  # 1x2 grid
COLUMN_OF_2 = layout(336, 672)  # 2x1 grid
TALL = layout(400, 1000)  # 3x1 grid, capacities [432, 576, 432]


# --- HiredConfig -------------------------------------------------------------------------------------


def test_config_defaults_are_the_papers():
    cfg = HiredConfig()
    assert (cfg.rate, cfg.alpha, cfg.distribution, cfg.newlines) == (0.2, 0.5, "spatial", "none")
    assert not cfg.is_stock
    assert HiredConfig(rate=1).is_stock and HiredConfig(rate=1.0, distribution="official").is_stock


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(rate=0.0), r"rate must be in \(0, 1\]"),
        (dict(rate=-0.1), r"rate must be in \(0, 1\]"),
        (dict(rate=1.5), r"rate must be in \(0, 1\]"),
        (dict(rate=float("nan")), "rate must be a finite number"),
        (dict(rate=float("inf")), "rate must be a finite number"),
        (dict(rate="0.2"), "rate must be a finite number"),
        (dict(rate=True), "rate must be a finite number"),
        (dict(alpha=-0.01), r"alpha must be in \[0, 1\]"),
        (dict(alpha=1.01), r"alpha must be in \[0, 1\]"),
        (dict(alpha=float("nan")), "alpha must be a finite number"),
        (dict(distribution="quadrants"), "distribution must be one of"),
        (dict(newlines="cols"), "newlines must be one of"),
    ],
)
def test_bad_config_raises_value_error_naming_the_option(kwargs, message):
    with pytest.raises(ValueError, match=message):
        HiredConfig(**kwargs)


def test_config_is_frozen():
    with pytest.raises(AttributeError):
        HiredConfig().rate = 0.5  # type: ignore[misc]


# --- the official code's numbers ---------------------------------------------------------------------


def descending() -> np.ndarray:
    """Early scores 576, 575, ...: the hot set is the first K tokens of the raster."""
    return np.arange(576, 0, -1, dtype=np.float32)


@pytest.mark.parametrize(
    "grid_layout, rate, total, full, sub_total, crops",
    [
        # hired-spec.md §2.2, alpha = 0.5 (K = 288): total / full / sub_total; the hot set is tokens 0..287
        (SQUARE, 0.1, 288, 144, 144, (72, 72, 0, 0)),
        (SQUARE, 0.2, 576, 288, 288, (144, 144, 0, 0)),
        (SQUARE, 0.4, 1152, 576, 576, (288, 288, 0, 0)),
        # 3 crops: bands of 192 hold 192 and 96 hot tokens: int(f32(2/3) * S'), int(f32(1/3) * S')
        (ROW_OF_3, 0.1, 230, 115, 115, (76, 38, 0)),
        (COLUMN_OF_3, 0.2, 460, 230, 230, (153, 76, 0)),
        (ROW_OF_3, 0.4, 921, 460, 461, (307, 153, 0)),
        # 2 crops: band 0 holds the whole hot set, so it gets sub_total itself
        (ROW_OF_2, 0.1, 172, 86, 86, (86, 0)),
        (COLUMN_OF_2, 0.2, 345, 172, 173, (173, 0)),
        (ROW_OF_2, 0.4, 691, 345, 346, (346, 0)),
    ],
)
def test_official_reproduces_the_worked_table(grid_layout, rate, total, full, sub_total, crops):
    plan = plan_budget(grid_layout, descending(), HiredConfig(rate=rate, alpha=0.5, distribution="official"))
    assert (plan.total, plan.base) == (total, full)
    assert plan.crops == crops
    assert sub_total - len(crops) < sum(plan.crops) <= sub_total
    assert plan.distribution == "official" and not plan.stock


def test_official_crop_budget_is_a_float32_product():
    # 2x2 at rate 0.1, alpha 0.25: T = 288, B = 72, S' = 216, K = 432; band counts 58, 122, 126, 126.
    # exact: 58 * 216 / 432 = 29, but f32(58/432) * 216 = 28.99999 -> 28; float64 gives 60 for 122, f32 61.
    early = np.zeros(576, dtype=np.float32)
    for band, count in enumerate([58, 122, 126, 126]):
        early[band * 144 : band * 144 + count] = 1.0
    plan = plan_budget(SQUARE, early, HiredConfig(rate=0.1, alpha=0.25, distribution="official"))
    assert (plan.total, plan.base) == (288, 72)
    assert plan.crops == (28, 61, 62, 62)


def test_official_on_a_1x3_grid_scores_crops_by_8_row_bands():
    # K = int(576 / 3) = 192: the hot set is base rows 8..15, which span all three side-by-side crops,
    # yet the official code counts it all in band 1 (rows 8..15) and gives crop 1 the whole share.
    early = np.zeros((24, 24), dtype=np.float32)
    early[8:16] = 1.0
    cfg = HiredConfig(rate=0.2, alpha=2 / 3, distribution="official")
    plan = plan_budget(ROW_OF_3, early.reshape(-1), cfg)
    assert (plan.total, plan.base) == (460, 306)
    assert plan.crops == (0, 154, 0)
    spatial = plan_budget(ROW_OF_3, early.reshape(-1), HiredConfig(rate=0.2, alpha=2 / 3))
    assert spatial.crops == (52, 51, 51)  # 154 / 3 each; the one left over goes to the lower crop


def test_official_caps_each_crop_at_one_image():
    # 2 crops at rate 0.9: T = 1555, B = 576, S' = 979, all of the hot set in band 0 -> int(1.0 * 979),
    # capped at 576; the other 403 are not given to crop 1
    plan = plan_budget(ROW_OF_2, descending(), HiredConfig(rate=0.9, alpha=0.5, distribution="official"))
    assert (plan.total, plan.base) == (1555, 576)
    assert plan.crops == (576, 0)
    assert plan.kept == 1152


def test_official_with_alpha_one_gives_crops_nothing():
    plan = plan_budget(SQUARE, descending(), HiredConfig(rate=0.4, alpha=1.0, distribution="official"))
    assert (plan.total, plan.base, plan.crops) == (1152, 576, (0, 0, 0, 0))


def test_official_refuses_a_crop_count_that_does_not_divide_576():
    five = layout(1680, 336, FIVE_CROPS)
    assert five.n_crops == 5
    with pytest.raises(ValueError, match=r"number of crops \(5\) to divide 576"):
        plan_budget(five, descending(), HiredConfig(distribution="official"))
    assert plan_budget(five, descending(), HiredConfig()).kept == int(6 * 576 * 0.2)
    assert plan_budget(five, descending(), HiredConfig(rate=1.0, distribution="official")).stock


# --- spatial: the paper's Eq. 1 with exact budgets ---------------------------------------------------


def test_scores_concentrated_in_one_quadrant_give_that_crop_the_most():
    # top-right quadrant 1.0, elsewhere 0.01: crop scores 1.44, 144, 1.44, 1.44 share S = 288
    # -> 2.796, 279.61, 2.796, 2.796 -> floors 2, 279, 2, 2 (285); the 3 left go to the largest remainders
    early = np.full((24, 24), 0.01)
    early[:12, 12:] = 1.0
    plan = plan_budget(SQUARE, early.reshape(-1), HiredConfig(rate=0.2, alpha=0.5))
    assert (plan.total, plan.base) == (576, 288)
    assert plan.crops == (3, 279, 3, 3)
    assert plan.kept == 576


def test_a_full_crop_takes_its_capacity_and_the_rest_is_shared_by_capacity():
    # TALL (3x1, capacities 432/576/432) at rate 0.6: T = 1382, B = 576, S = 806; all early mass in base
    # rows 0..6 (crop 0): crop 0 takes 432, the other 374 go 576:432 -> 213.71, 160.29 -> 214, 160
    early = np.zeros((24, 24))
    early[:7] = 1.0
    plan = plan_budget(TALL, early.reshape(-1), HiredConfig(rate=0.6, alpha=0.5))
    assert TALL.capacities.tolist() == [432, 576, 432]
    assert (plan.total, plan.base) == (1382, 576)
    assert plan.crops == (432, 214, 160)
    assert plan.kept == 1382


def test_water_fill_reshares_what_a_capped_crop_cannot_take():
    assert water_fill(400, np.array([10.0, 1.0, 1.0]), np.array([100, 500, 500])) == [100, 150, 150]
    assert water_fill(300, np.array([5.0, 0.0, 0.0]), np.array([100, 300, 100])) == [100, 150, 50]
    assert water_fill(10, np.array([0.0, 0.0]), np.array([0, 30])) == [0, 10]


def test_zero_capacity_crops_get_nothing_however_high_their_score():
    assert water_fill(7, np.array([3.0, 1.0, 0.0]), np.array([0, 4, 4])) == [0, 4, 3]


def test_largest_remainder_ties_go_to_the_lower_crop():
    assert largest_remainder([Fraction(145, 2)] * 4) == [73, 73, 72, 72]
    assert largest_remainder([Fraction(1, 3), Fraction(2, 3), Fraction(1, 3), Fraction(2, 3)]) == [0, 1, 0, 1]
    # through plan_budget: uniform scores, S = T = 290 over four equal crops
    plan = plan_budget(SQUARE, np.ones(576), HiredConfig(rate=0.1007, alpha=0.0))
    assert (plan.total, plan.base, plan.crops) == (290, 0, (73, 73, 72, 72))


def test_what_no_crop_can_take_goes_back_to_the_base_image():
    # a 1-pixel-wide image keeps no crop token after unpadding: T = 864, B = 432 -> base takes up to 576
    thin = layout(1, 4000)
    assert thin.capacities.tolist() == [0, 0]
    plan = plan_budget(thin, np.ones(576), HiredConfig(rate=0.5, alpha=0.5))
    assert (plan.total, plan.base, plan.crops) == (864, 576, (0, 0))
    split, leftover = spatial_split(500, np.array([1.0, 1.0]), np.array([100, 200]))
    assert split == (100, 200) and leftover == 200


def test_spatial_accepts_alpha_one():
    plan = plan_budget(SQUARE, np.ones(576), HiredConfig(rate=0.2, alpha=1.0))
    assert (plan.base, plan.crops) == (576, (0, 0, 0, 0))
    plan = plan_budget(SQUARE, np.ones(576), HiredConfig(rate=0.4, alpha=1.0))
    assert (plan.base, plan.crops) == (576, (144, 144, 144, 144))


def test_all_zero_early_scores_share_by_capacity():
    plan = plan_budget(TALL, np.zeros(576), HiredConfig(rate=0.2, alpha=0.5))
    # T = 460, B = 230, S = 230 shared 432:576:432 -> 69, 92, 69
    assert (plan.total, plan.base, plan.crops) == (460, 230, (69, 92, 69))


@pytest.mark.parametrize("distribution", ["spatial", "official"])
def test_rate_one_keeps_every_valid_token(distribution):
    wide = layout(800, 600)
    plan = plan_budget(wide, np.ones(576), HiredConfig(rate=1.0, alpha=0.3, distribution=distribution))
    assert plan.stock and plan.base == 576
    assert plan.crops == tuple(wide.capacities.tolist()) == (432, 432, 432, 432)
    assert plan.total == 2880 and plan.kept == 576 + 4 * 432


@pytest.mark.parametrize(
    "scores, message",
    [
        (np.ones(575), r"shape \[576\]"),
        (np.ones((24, 24)), r"shape \[576\]"),
        (np.r_[np.ones(575), np.nan], "finite"),
        (np.r_[np.ones(575), np.inf], "finite"),
        (np.r_[np.ones(575), -1e-9], ">= 0"),
        (np.array(["a"] * 576), "real numbers"),
    ],
)
@pytest.mark.parametrize("distribution", ["spatial", "official"])
def test_bad_early_scores_raise_value_error(scores, message, distribution):
    with pytest.raises(ValueError, match=message):
        plan_budget(SQUARE, scores, HiredConfig(distribution=distribution))


# --- properties over random layouts, scores and options ----------------------------------------------


@st.composite
def cases(draw):
    pins = draw(st.sampled_from([PINS, WIDE_PINS]))
    width = draw(st.integers(1, 5000))
    height = draw(st.integers(1, 5000))
    seed = draw(st.integers(0, 2**32 - 1))
    rate = draw(st.one_of(st.floats(0.001, 1.0), st.sampled_from([0.1, 0.2, 0.4, 1.0])))
    alpha = draw(st.one_of(st.floats(0.0, 1.0), st.sampled_from([0.0, 0.5, 1.0])))
    rng = np.random.default_rng(seed)
    early = rng.random(576) * rng.integers(0, 2, 576)  # about half exact zeros
    if draw(st.booleans()):
        early = np.round(early, 1)  # many exact ties
    return layout(width, height, pins), early, rate, alpha


@settings(max_examples=300, deadline=None, derandomize=True)
@given(cases())
def test_spatial_keeps_exactly_min_of_total_and_what_fits(case):
    grid_layout, early, rate, alpha = case
    plan = plan_budget(grid_layout, early, HiredConfig(rate=rate, alpha=alpha))
    capacity = int(grid_layout.capacities.sum())
    assert plan.total == int(grid_layout.n_images * 576 * rate)
    assert plan.kept == min(plan.total, 576 + capacity)
    assert 0 <= plan.base <= 576
    assert len(plan.crops) == grid_layout.n_crops
    assert all(0 <= c <= cap for c, cap in zip(plan.crops, grid_layout.capacities))
    if not plan.stock:
        assert plan.base >= min(int(plan.total * alpha), 576)


@settings(max_examples=200, deadline=None, derandomize=True)
@given(cases())
def test_official_never_plans_more_than_the_total(case):
    grid_layout, early, rate, alpha = case
    plan = plan_budget(grid_layout, early, HiredConfig(rate=rate, alpha=alpha, distribution="official"))
    assert isinstance(plan, BudgetPlan)
    if plan.stock:
        return
    assert plan.base == min(int(plan.total * alpha), 576)
    assert plan.kept <= plan.total
    assert all(0 <= c <= 576 for c in plan.crops)


@pytest.mark.parametrize("distribution", ["spatial", "official"])
@pytest.mark.parametrize("rate, base", [(0.2, 115), (0.5, 288), (0.01, 5), (1.0, 576)])
def test_one_partition_gets_the_whole_budget_under_either_distribution(distribution, rate, base):
    """LLaVA-1.5 (no pinpoints): T = int(576 * rate), all of it to the one image; alpha has nothing to split."""
    layout = AnyresLayout.for_image(width=1300, height=380, grid_pinpoints=[])
    early = np.random.default_rng(0).random(576)
    plan = plan_budget(layout, early, HiredConfig(rate=rate, alpha=0.3, distribution=distribution))
    assert (plan.total, plan.base, plan.crops, plan.stock) == (base, base, (), rate == 1.0)
