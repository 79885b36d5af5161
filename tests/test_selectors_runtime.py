"""The selector option through the Pipeline on tiny: exact kept counts on every crop grid, HiRED unchanged,
random reproducible by seed, VisionZip's merged tokens the means of their groups' features."""

from __future__ import annotations

import numpy as np
import pytest

from hired.selectors import SELECTORS
from runtime.errors import BudgetError
from runtime.pipeline import Trace
from runtime.selection import one_blas_thread
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


def blas_threads() -> list[int]:
    from threadpoolctl import threadpool_info

    return [lib["num_threads"] for lib in threadpool_info() if lib["user_api"] == "blas"]


def test_selection_runs_blas_on_one_thread_and_the_last_to_leave_restores_it():
    from threadpoolctl import threadpool_limits

    with threadpool_limits(2, user_api="blas"):  # the process's own setting, whatever the machine
        before = blas_threads()
        assert before and set(before) == {2}
        first, second = one_blas_thread(), one_blas_thread()  # two requests' selections overlapping
        first.__enter__()
        second.__enter__()
        first.__exit__(None, None, None)
        assert set(blas_threads()) == {1}  # the other one still runs
        second.__exit__(None, None, None)
        assert blas_threads() == before
