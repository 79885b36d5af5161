"""The selector option through the Pipeline on tiny: exact kept counts on every crop grid, HiRED unchanged,
random reproducible by seed, VisionZip's merged tokens the means of their groups' features."""

from __future__ import annotations

import numpy as np
import pytest

from hired.selectors import SELECTORS
from runtime.errors import BudgetError
from runtime.pipeline import Trace
from tests.helpers import scene_array

PROMPT = "What is in the picture?"
# (width, height) of one image per crop grid: 1x2, 2x1, 2x2 (padded), 1x3, 3x1
GRIDS = {(1, 2): (640, 300), (2, 1): (320, 600), (2, 2): (800, 600), (1, 3): (1000, 300), (3, 1): (300, 1000)}
RATES = (0.1, 0.2, 0.5)


def generate(pipe, image, trace=None, **options):
    return pipe.generate(image, PROMPT, max_new_tokens=1, trace=trace, **options)


@pytest.mark.parametrize("selector", SELECTORS)
@pytest.mark.parametrize("grid", list(GRIDS))
def test_every_selector_keeps_hireds_exact_count_on_every_grid(pipe, selector, grid):
    width, height = GRIDS[grid]
    rate = RATES[(SELECTORS.index(selector) + list(GRIDS).index(grid)) % 3]  # each pair once, all rates covered
    trace = Trace()
    r = generate(pipe, scene_array(width, height), trace, budget=rate, selector=selector, seed=3)
    layout = trace.layout
    assert layout.grid == grid
    expected = min(int(layout.n_images * 576 * rate), 576 + int(layout.capacities.sum()))
    assert r.visual_tokens["kept"] == sum(r.visual_tokens["per_image"]) == expected
    assert r.selector == selector and r.to_dict()["selector"] == selector
    assert r.budget["total"] == int(layout.n_images * 576 * rate)


def test_hired_selector_is_todays_hired(pipe):
    image = scene_array(800, 600)
    a, b = Trace(), Trace()
    ra = generate(pipe, image, a, budget=0.2)
    rb = generate(pipe, image, b, budget=0.2, selector="hired")
    assert ra.token_ids == rb.token_ids and not b.groups
    np.testing.assert_array_equal(a.inputs_embeds, b.inputs_embeds)


def test_random_is_the_same_for_a_seed_and_differs_for_another(pipe):
    image = scene_array(800, 600)
    kept = []
    for seed in (5, 5, 6):
        t = Trace()
        generate(pipe, image, t, budget=0.2, selector="random", seed=seed)
        kept.append(np.concatenate([k + i * 576 for i, k in enumerate(t.kept_indices)]))
    np.testing.assert_array_equal(kept[0], kept[1])
    assert not np.array_equal(kept[0], kept[2])


def test_visionzip_merged_tokens_are_the_means_of_their_groups_features(pipe):
    t = Trace()
    generate(pipe, scene_array(800, 600), t, budget=0.2, selector="visionzip")
    assert t.groups, "visionzip at 0.2 merges tokens"
    start = len(pipe.prompt.encode(PROMPT)[0])  # the visual span's first position in inputs_embeds
    flat = t.features.reshape(-1, t.features.shape[-1])
    slots = sorted(t.groups)
    means = np.stack([flat[t.groups[s]].astype(np.float32).mean(axis=0) for s in slots])
    projector = pipe.projector
    name = projector.inputs["features"]
    (expected,) = projector.run({name: means.astype(projector.dtype(name))}, [projector.outputs["projected"]])
    where = {int(v): j for j, v in enumerate(t.order)}
    got = np.stack([t.inputs_embeds[start + where[s]] for s in slots])
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)
    assert any(len(t.groups[s]) > 1 for s in slots)
    # and the merged slot is not the slot token's own projection (unless its group is only itself)
    single = [s for s in slots if len(t.groups[s]) > 1][0]
    (own,) = projector.run({name: flat[[single]].astype(projector.dtype(name))}, [projector.outputs["projected"]])
    assert not np.allclose(t.inputs_embeds[start + where[single]], own[0])


def test_unknown_selector_lists_the_choices_in_one_line(pipe):
    with pytest.raises(BudgetError, match="selector must be one of hired, cls, uniform, random, visionzip; got 'x'"):
        generate(pipe, scene_array(64, 64), selector="x")
    with pytest.raises(BudgetError, match='use it with selector="hired"'):
        generate(pipe, scene_array(64, 64), selector="cls", distribution="official")


def test_the_kept_token_picture_outlines_merged_groups(pipe):
    from runtime.visualize import render_kept

    image = scene_array(672, 672)
    t = Trace()
    r = generate(pipe, image, t, budget=0.1, selector="visionzip")
    picture = np.asarray(render_kept(t, pipe.manifest.image_processor, r))
    plain = Trace()
    rh = generate(pipe, image, plain, budget=0.1, selector="hired")
    hired_picture = np.asarray(render_kept(plain, pipe.manifest.image_processor, rh))
    assert picture.shape == hired_picture.shape
    # group outline colours appear only in the visionzip picture (the hired one has no merged tokens)
    red = np.all(picture == (230, 25, 75), axis=-1).sum()
    assert red > 0 and np.all(hired_picture == (230, 25, 75), axis=-1).sum() == 0


def test_the_committed_similarity_graphs_are_what_export_builds():
    from export.nearest_graph import stale

    assert stale() == []


def similarity_case(seed: int, dtype=np.float32):
    """Features of 5 images with 45, 12, 0, 30 and 12 targets among their rows (blocks 3, 1, -, 2, 1), a zero
    target vector and a duplicated target row (a tie) included."""
    rng = np.random.default_rng(seed)
    feats = rng.standard_normal((5, 576, 32)).astype(dtype)
    rows, targets = [], []
    for g in (45, 12, 0, 30, 12):
        image_rows = np.sort(rng.choice(576, 400, replace=False))
        rows.append(image_rows)
        targets.append(image_rows[:: max(1, 400 // g)][:g] if g else np.empty(0, np.int64))
    feats[0, targets[0][3]] = 0  # a zero target: similarity 0 with everything
    feats[1, targets[1][5]] = feats[1, targets[1][2]]  # equal targets: the lower one wins
    return feats, rows, targets


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_nearest_target_on_onnxruntime_is_numpys(dtype):
    from hired.selectors import nearest_target
    from runtime.similarity import NearestTarget

    feats, rows, targets = similarity_case(0, dtype)
    got, expected = NearestTarget()(feats, rows, targets), nearest_target(feats, rows, targets)
    assert [len(x) for x in got] == [400, 400, 0, 400, 400]
    for g, e in zip(got, expected):
        np.testing.assert_array_equal(g, e)
    assert 5 not in got[1]  # the tie went to target 2


def test_similarity_batches_are_runs_of_equal_column_blocks():
    from runtime.similarity import batches

    assert batches([45, 12, 12, 12, 12]) == [(0, 1), (1, 5)]
    assert batches([45, 12, 0, 30, 12]) == [(0, 1), (1, 2), (3, 4), (4, 5)]
    assert batches([16, 1, 17, 32]) == [(0, 2), (2, 4)] and batches([0, 0]) == []


def test_a_missing_similarity_graph_falls_back_to_numpy_with_one_warning(tmp_path, monkeypatch, caplog):
    import runtime.similarity as similarity
    from hired.selectors import nearest_target

    monkeypatch.setattr(similarity, "GRAPH_DIR", tmp_path)
    feats, rows, targets = similarity_case(1)
    nearest = similarity.NearestTarget()
    with caplog.at_level("WARNING", logger="hired_edge"):
        first, second = nearest(feats, rows, targets), nearest(feats, rows, targets)
    warned = [r.getMessage() for r in caplog.records if "VisionZip groups on numpy" in r.getMessage()]
    assert len(warned) == 1 and "nearest_fp32.onnx cannot be loaded" in warned[0]
    for a, b, e in zip(first, second, nearest_target(feats, rows, targets)):
        np.testing.assert_array_equal(a, e)
        np.testing.assert_array_equal(b, e)
