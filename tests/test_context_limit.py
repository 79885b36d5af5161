"""The context check of runtime.pipeline: a request that cannot fit the KV cache is refused before any graph runs.

The prompt alone (text + each image's largest visual span under the request's budget, runtime.visual.span_bound)
filling the context is a PromptError; max_new_tokens taking it past the context is a GenerationError that names the
limit and the most new tokens that fit. The graphs here are stand-ins that fail the test if they are run."""

from __future__ import annotations

import numpy as np
import pytest

from hired import AnyresLayout, HiredConfig
from runtime import GenerationError, PromptError
from runtime.manifest import Manifest
from runtime.pipeline import Pipeline
from runtime.session import OrtSession
from runtime.visual import span_bound
from tests.helpers import scene

PROMPT = "What is in this picture?"
CONTEXT = 600


class MustNotRun:
    """A real session's surface (names, dtypes, metadata, provider) whose graph must not run."""

    def __init__(self, session: OrtSession):
        self._session = session

    def __getattr__(self, name):
        if name in ("run", "run_with_binding", "io_binding"):
            pytest.fail(f"the {self._session.name} graph ran for a request the context check should have refused")
        return getattr(self._session, name)


@pytest.fixture(scope="module")
def guarded(tiny_bundle):
    """A Pipeline of CONTEXT tokens whose three graphs fail the test if they are run."""
    manifest = Manifest.from_file(tiny_bundle)
    real = {g: OrtSession.from_manifest(manifest, g) for g in ("vision", "projector", "decoder")}
    with Pipeline.from_sessions(manifest, **{g: MustNotRun(s) for g, s in real.items()}, max_context=CONTEXT) as p:
        yield p


@pytest.fixture(scope="module")
def small(tiny_bundle):
    with Pipeline.load(tiny_bundle, max_context=CONTEXT) as p:
        yield p


def prompt_room(pipe: Pipeline, image, budget: float) -> int:
    """Tokens the prompt takes before vision: its text + the image's bound (exact here: spatial, no newlines)."""
    text = sum(len(ids) for ids in pipe.prompt.encode_slots(PROMPT, 0 if image is None else 1))
    if image is None:
        return text
    layout = AnyresLayout.for_image(width=image.width, height=image.height,
                                    grid_pinpoints=pipe.manifest.image_processor.grid_pinpoints)  # fmt: skip
    return text + span_bound(layout, pipe.hired_config(budget=budget))


@pytest.mark.parametrize("image, budget", [(scene(64, 48), 0.3), (scene(300, 200), 0.05), (None, 0.2)])
def test_max_new_tokens_past_the_context_is_a_generation_error_before_any_graph(guarded, small, image, budget):
    room = CONTEXT - prompt_room(guarded, image, budget)
    with pytest.raises(GenerationError, match=f"exceeds the {CONTEXT}-token context") as err:
        guarded.generate(image, PROMPT, budget=budget, max_new_tokens=room + 1)
    assert f"ask for at most {room} new tokens" in str(err.value) and "\n" not in str(err.value)
    # the limit it names is exact: that many new tokens run to the last position of the cache
    r = small.generate(image, PROMPT, budget=budget, max_new_tokens=room, min_new_tokens=room)
    assert len(r.token_ids) == room
    assert guarded.active_requests == 0


def test_a_prompt_whose_text_alone_fills_the_context_stays_a_prompt_error(guarded):
    long = "word " * CONTEXT
    for image in (None, scene(64, 48)):
        with pytest.raises(PromptError, match=f"fills the {CONTEXT}-token context; shorten it"):
            guarded.generate(image, long, max_new_tokens=1)


def test_an_image_span_that_fills_the_context_is_a_prompt_error_naming_the_budget(guarded):
    # budget 1.0: the stock span of a 3-partition image (1368 tokens) is more than the whole context
    with pytest.raises(PromptError, match="visual tokens, which fills the 600-token context; .* lower the budget"):
        guarded.generate(scene(64, 48), PROMPT, budget=1.0, max_new_tokens=1)


def test_auto_budget_is_refused_before_calibrating_when_even_min_budget_cannot_fit(guarded):
    # calibration would run the graphs: the check at the lowest rate comes first
    with pytest.raises(GenerationError, match=f"exceeds the {CONTEXT}-token context"):
        guarded.generate(scene(64, 48), PROMPT, budget="auto", target_ttft_ms=100.0, max_new_tokens=CONTEXT - 10)


PINS = [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]


@pytest.mark.parametrize("single", [False, True], ids=["anyres", "one-partition"])
def test_span_bound_is_never_below_the_packed_span_and_exact_for_spatial_without_newlines(single):
    from runtime.selection import select_stage

    rng = np.random.default_rng(0)
    for _ in range(40):
        w, h = (int(v) for v in rng.integers(1, 2500, 2))
        layout = AnyresLayout.for_image(width=w, height=h, grid_pinpoints=[] if single else PINS)
        n = layout.n_images
        early, late = rng.random((n, 576), np.float32), rng.random((n, 576), np.float32)
        feats = rng.random((n, 576, 4), np.float32)
        for rate in (0.05, 0.2, 0.5, 1.0):
            for distribution, selectors in (("spatial", ("hired", "cls", "uniform", "random", "visionzip")),
                                            ("official", ("hired",))):  # fmt: skip
                if distribution == "official" and n > 1 and 576 % (n - 1):
                    continue  # the official code's bands need n - 1 to divide 576
                for newlines in ("none", "rows"):
                    cfg = HiredConfig(rate=rate, alpha=0.5, distribution=distribution, newlines=newlines)
                    for selector in selectors:
                        _, order = select_stage(layout, cfg, selector, 0, feats, early, late)
                        bound = span_bound(layout, cfg)
                        assert order.shape[0] <= bound, (w, h, cfg, selector)
                        if distribution == "spatial" and (newlines == "none" or rate == 1.0):
                            assert order.shape[0] == bound, (w, h, cfg, selector)
