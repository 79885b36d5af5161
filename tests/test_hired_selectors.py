"""hired.selectors: every selector keeps exactly HiRED's count, never padding, in raster order, packable."""

from __future__ import annotations

import numpy as np
import pytest

from hired import AnyresLayout, HiredConfig, pack_tokens, plan_budget, select_tokens, top_k
from hired.select import top_k_rows
from hired.selectors import (
    SELECTORS,
    MergedGroups,
    apply_selector,
    contextual_groups,
    dominant_count,
    uniform_plan,
    valid_candidates,
)

PINS = [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]
# (width, height) of one image per crop grid, most with unpadding: 1x2, 2x1, 2x2, 1x3, 3x1, padded 2x2
SIZES = {"1x2": (640, 300), "2x1": (320, 600), "2x2": (672, 672), "1x3": (1000, 300), "3x1": (300, 1000),
         "2x2-padded": (800, 600)}  # fmt: skip
RATES = (0.1, 0.2, 0.5)
D = 16


def inputs(width: int, height: int, seed: int = 0):
    layout = AnyresLayout.for_image(width=width, height=height, grid_pinpoints=PINS)
    rng = np.random.default_rng(seed)
    n = layout.n_images
    early = rng.random((n, 576), dtype=np.float32) + 1e-3
    late = rng.random((n, 576), dtype=np.float32) + 1e-3
    feats = rng.standard_normal((n, 576, D)).astype(np.float32)
    return layout, early, late, feats


def run(name, layout, early, late, feats, rate, seed=0):
    return apply_selector(name, layout, early, late, HiredConfig(rate=rate), features=feats, seed=seed)


def test_the_grids_are_the_ones_named():
    grids = {k: AnyresLayout.for_image(width=w, height=h, grid_pinpoints=PINS).grid for k, (w, h) in SIZES.items()}
    assert grids == {"1x2": (1, 2), "2x1": (2, 1), "2x2": (2, 2), "1x3": (1, 3), "3x1": (3, 1), "2x2-padded": (2, 2)}
    assert AnyresLayout.for_image(width=800, height=600, grid_pinpoints=PINS).capacities.sum() < 4 * 576


@pytest.mark.parametrize("name", SELECTORS)
@pytest.mark.parametrize("size", list(SIZES))
@pytest.mark.parametrize("rate", RATES)
def test_every_selector_keeps_exactly_hireds_count(name, size, rate):
    layout, early, late, feats = inputs(*SIZES[size])
    sel = run(name, layout, early, late, feats, rate)
    total = int(layout.n_images * 576 * rate)
    expected = min(total, 576 + int(layout.capacities.sum()))
    assert sum(len(k) for k in sel.keep) == expected == sel.plan.kept
    assert sel.plan.total == total
    for i, k in enumerate(sel.keep):
        assert np.all(np.diff(k) > 0)  # sorted, unique: raster order
        if i:
            assert layout.valid_mask[i - 1][k].all()  # never padding
    order = pack_tokens(sel.keep, layout, HiredConfig(rate=rate))  # HiRED's packing accepts it
    assert order.shape == (expected,)


@pytest.mark.parametrize("size", list(SIZES))
def test_hired_selector_is_plan_budget_and_select_tokens(size):
    layout, early, late, feats = inputs(*SIZES[size])
    cfg = HiredConfig(rate=0.2)
    plan = plan_budget(layout, early[0], cfg)
    sel = apply_selector("hired", layout, early, late, cfg)
    assert sel.plan == plan and not sel.groups
    for a, b in zip(sel.keep, select_tokens(late, plan, layout), strict=True):
        np.testing.assert_array_equal(a, b)


def test_official_distribution_stays_hireds_own():
    layout, early, late, feats = inputs(672, 672)
    cfg = HiredConfig(rate=0.2, distribution="official")
    assert apply_selector("hired", layout, early, late, cfg).plan.distribution == "official"
    with pytest.raises(ValueError, match='use selector="hired"'):
        apply_selector("cls", layout, early, late, cfg)


def test_unknown_selector_names_the_choices():
    layout, early, late, _ = inputs(672, 672)
    with pytest.raises(ValueError, match="hired, cls, uniform, random, visionzip; got 'topk'"):
        apply_selector("topk", layout, early, late, HiredConfig())


@pytest.mark.parametrize("name", SELECTORS)
def test_rate_one_is_the_stock_model_for_every_selector(name):
    layout, early, late, feats = inputs(800, 600)
    sel = run(name, layout, early, late, feats, 1.0)
    assert sel.plan.stock and not sel.groups
    assert sum(len(k) for k in sel.keep) == 576 + layout.capacities.sum()


def test_cls_is_one_global_ranking():
    layout, early, late, feats = inputs(672, 672)
    sel = run("cls", layout, early, late, feats, 0.1)
    flat = late.reshape(-1)
    kept = np.concatenate([k + i * 576 for i, k in enumerate(sel.keep)])
    dropped = np.setdiff1d(np.arange(flat.size), kept)
    assert flat[kept].min() >= flat[dropped].max()


def test_uniform_shares_the_crops_part_by_valid_tokens():
    layout = AnyresLayout.for_image(width=800, height=600, grid_pinpoints=PINS)  # top/bottom crops lose rows
    plan = uniform_plan(layout, HiredConfig(rate=0.2, alpha=0.5))
    assert plan.base == 288 and sum(plan.crops) == 288
    caps = layout.capacities
    assert plan.crops[0] == plan.crops[1] and plan.crops[2] == plan.crops[3]
    assert abs(plan.crops[0] - 288 * caps[0] / caps.sum()) < 1


def test_random_is_reproducible_by_seed():
    layout, early, late, feats = inputs(800, 600)
    a = run("random", layout, early, late, feats, 0.2, seed=7)
    b = run("random", layout, early, late, feats, 0.2, seed=7)
    c = run("random", layout, early, late, feats, 0.2, seed=8)
    assert all(np.array_equal(x, y) for x, y in zip(a.keep, b.keep, strict=True))
    assert not all(np.array_equal(x, y) for x, y in zip(a.keep, c.keep, strict=True))


def test_visionzip_groups_partition_the_tokens_not_kept_as_dominant():
    layout, early, late, feats = inputs(800, 600)
    cfg = HiredConfig(rate=0.2)
    sel = apply_selector("visionzip", layout, early, late, cfg, features=feats)
    plan = plan_budget(layout, early[0], cfg)
    assert sel.plan == plan
    for i, share in enumerate((plan.base, *plan.crops)):
        slots = sel.keep[i] + i * 576
        merged = [s for s in slots if int(s) in sel.groups]
        assert len(merged) == share - dominant_count(share)
        members = np.concatenate([sel.groups[int(s)] for s in merged]) if merged else np.zeros(0, np.int64)
        for s in merged:
            assert sel.groups[int(s)][0] == s  # a merged token sits at its group's first token
        dominant = np.setdiff1d(slots, merged)
        valid = np.arange(576) if i == 0 else np.flatnonzero(layout.valid_mask[i - 1])
        # dominant + every group member = the image's valid tokens, each once
        together = np.sort(np.concatenate([dominant, members]))
        np.testing.assert_array_equal(together, valid + i * 576)
        if dominant.size:
            others = np.setdiff1d(valid, dominant - i * 576)
            assert late[i, dominant - i * 576].min() >= late[i, others].max()


@pytest.mark.parametrize("size", ["2x2-padded", "1x3", "2x1"])
@pytest.mark.parametrize("rate", RATES)
def test_visionzip_groups_are_each_images_contextual_groups(size, rate):
    """The all-images-at-once grouping equals contextual_groups image by image on the remaining tokens: each group
    is the rest tokens sharing a label, in raster order, its slot the first of them."""
    layout, early, late, feats = inputs(*SIZES[size], seed=2)
    cfg = HiredConfig(rate=rate)
    sel = apply_selector("visionzip", layout, early, late, cfg, features=feats)
    plan = plan_budget(layout, early[0], cfg)
    expected = {}
    for i, share in enumerate((plan.base, *plan.crops)):
        valid = np.arange(576) if i == 0 else np.flatnonzero(layout.valid_mask[i - 1])
        dominant = top_k(late[i], dominant_count(share), valid)
        rest = np.setdiff1d(valid, dominant)
        if share - dominant_count(share):
            labels = contextual_groups(feats[i], rest, share - dominant_count(share))
            for g in range(share - dominant_count(share)):
                members = rest[labels == g] + i * 576
                expected[int(members[0])] = members
    assert sorted(sel.groups) == sorted(expected)
    for slot, members in expected.items():
        np.testing.assert_array_equal(sel.groups[slot], members)


def test_merged_groups_read_as_a_mapping():
    groups = MergedGroups(np.array([3, 7]), np.array([3, 5, 7, 9, 11]), np.array([2, 5]))
    assert dict(groups.items()).keys() == {3, 7} and len(groups) == 2 and 7 in groups and 4 not in groups
    np.testing.assert_array_equal(groups[7], [7, 9, 11])
    again = MergedGroups.of({3: np.array([3, 5]), 7: np.array([7, 9, 11])})
    np.testing.assert_array_equal(again.members, groups.members)
    np.testing.assert_array_equal(again.ends, groups.ends)
    assert len(MergedGroups()) == 0 and not MergedGroups.of({})


def test_contextual_groups_join_the_most_similar_target():
    feats = np.array([[1, 0], [0, 1], [0.9, 0.1], [0.1, 0.9], [1, 0.05]], dtype=np.float32)
    labels = contextual_groups(feats, np.arange(5), 2)  # targets: tokens 0 and 2 (step 5 // 2 = 2)
    assert labels.tolist() == [0, 1, 1, 1, 0]
    rest = np.array([0, 1, 4])  # targets among the rest: tokens 0 and 1 (step 3 // 2 = 1)
    assert contextual_groups(feats, rest, 2).tolist() == [0, 1, 0]


def test_valid_candidates_counts_base_and_unpadded_crop_tokens():
    layout = AnyresLayout.for_image(width=800, height=600, grid_pinpoints=PINS)
    assert valid_candidates(layout).size == 576 + layout.capacities.sum()


def test_visionzip_without_features_is_refused():
    layout, early, late, _ = inputs(672, 672)
    with pytest.raises(ValueError, match="visionzip needs features"):
        apply_selector("visionzip", layout, early, late, HiredConfig())


@pytest.mark.parametrize("seed", range(6))
def test_top_k_rows_is_top_k_on_every_row(seed):
    """The all-rows-at-once top-k equals top_k row by row among each row's candidates: ties (few distinct
    scores) to the lower index, k = 0, k = every candidate, rows with padding."""
    rng = np.random.default_rng(seed)
    n, m = 5, 576
    scores = rng.integers(0, 4 if seed % 2 else 1000, size=(n, m)).astype(np.float32)
    candidates = rng.random((n, m)) < (0.5 if seed % 3 else 1.0)
    candidates[0] = True
    counts = candidates.sum(axis=1)
    ks = np.array([0, counts[1], *rng.integers(0, counts[2:] + 1)])
    got = top_k_rows(scores, ks, candidates)
    for i in range(n):
        np.testing.assert_array_equal(got[i], top_k(scores[i], int(ks[i]), np.flatnonzero(candidates[i])))


def test_contextual_groups_of_fp16_features_are_those_of_their_float32_values():
    rng = np.random.default_rng(1)
    feats = rng.standard_normal((576, 64)).astype(np.float16)  # an fp16 bundle's vision graph gives fp16 features
    rest = np.sort(rng.choice(576, 400, replace=False))
    np.testing.assert_array_equal(contextual_groups(feats, rest, 30),
                                  contextual_groups(feats.astype(np.float32), rest, 30))  # fmt: skip
