"""budget="auto": the governor's choice (largest rate predicted to meet the target, monotone in the target, within
the context), its self-calibrating safety factor and robust fits, lazy calibration, the result's fields, the
calibration cache and bad input."""

from __future__ import annotations

import json
import logging
import math

import numpy as np
import pytest

from hired import AnyresLayout, HiredConfig
from runtime.errors import BudgetError, HiredError
from runtime.governor import CACHE_FORMAT, RATIO_WINDOW, Governor, fit_increasing, spans_at, visual_span
from runtime.options import RequestOptions
from runtime.pipeline import Pipeline
from tests.helpers import scene_array

PINS = [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]
TTFT_KEYS = ("preprocess", "vision", "select", "projector", "prefill")


def ttft(result) -> float:
    return sum(result.timings_ms[k] for k in TTFT_KEYS)


@pytest.fixture
def cache_home(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    return tmp_path / "cache" / "hired-edge" / "governor"


def synthetic_ms(span: int, text: int = 20, slow: float = 1.0) -> dict[str, float]:
    """Made-up stage times (s) of a 5-partition request: vision 100 ms, prefill 0.2 L + 1e-4 L^2 ms, x `slow`."""
    length = span + text
    return {"preprocess": 0.01, "vision": 0.1 * slow, "select": 0.001 * slow, "projector": span * 1e-6 * slow,
            "prefill": slow * (0.2 * length + 1e-4 * length**2) / 1000}  # fmt: skip


def synthetic(manifest, folder, spans=(150, 600, 1500, 2928) * 3) -> Governor:
    """A governor fed synthetic_ms at `spans` (each ratio it keeps is then about 1, so its safety factor is)."""
    gov = Governor(manifest, "cpu", min_budget=0.05, folder=folder)
    for span in spans:
        gov.observe(n_images=5, span=span, prompt_tokens=span + 20, timings_s=synthetic_ms(span))
    return gov


def test_choice_is_the_largest_rate_meeting_the_target_and_monotone_in_it(pipe, tmp_path):
    gov = synthetic(pipe.manifest, tmp_path)
    assert gov.calibrated
    layout = AnyresLayout.for_image(width=1000, height=1000, grid_pinpoints=PINS)
    cfg = HiredConfig()
    rates = np.linspace(0.05, 1.0, 96)
    predicted = gov.predict_ms([layout], cfg, 20, rates)
    assert np.all(np.diff(predicted) >= 0)
    chosen = []
    for target in np.linspace(predicted[0] - 5, predicted[-1] + 50, 40):
        c = gov.choose([layout], cfg, text_tokens=20, target_ms=float(target))
        assert c.reachable == (c.predicted_ms <= target)
        if c.reachable and c.rate < 1.0:  # the next candidate rate would miss the target
            assert gov.predict_ms([layout], cfg, 20, np.array([c.rate + 0.005]))[0] > target
        chosen.append(c.rate)
    assert chosen == sorted(chosen) and chosen[0] == 0.05 and chosen[-1] == 1.0


def test_several_images_share_one_rate_predicted_from_their_summed_partitions_and_spans(pipe, tmp_path):
    gov = synthetic(pipe.manifest, tmp_path)
    a = AnyresLayout.for_image(width=800, height=600, grid_pinpoints=PINS)  # 2x1 grid: 3 partitions
    b = AnyresLayout.for_image(width=450, height=1000, grid_pinpoints=PINS)  # 1x2 grid: 3 partitions
    cfg, rates = HiredConfig(), np.linspace(0.05, 1.0, 20)
    spans = spans_at([a, b], cfg, rates)
    assert np.array_equal(spans, [visual_span(a, cfg, r) + visual_span(b, cfg, r) for r in rates])
    both = gov.predict_ms([a, b], cfg, 20, rates, spent_ms=3.0)
    assert np.array_equal(both, gov._predict(a.n_images + b.n_images, spans, 20, 3.0))
    assert np.all(both > gov.predict_ms([a], cfg, 20, rates, spent_ms=3.0))  # the second image costs time
    chosen = []
    for target in np.linspace(both[0] - 5, both[-1] + 50, 30):
        c = gov.choose([a, b], cfg, text_tokens=20, target_ms=float(target), spent_ms=3.0)
        if c.reachable and c.rate < 1.0:  # the next candidate rate would miss the target
            assert gov.predict_ms([a, b], cfg, 20, np.array([c.rate + 0.005]), spent_ms=3.0)[0] > target
        assert c.rate <= gov.choose([a], cfg, text_tokens=20, target_ms=float(target), spent_ms=3.0).rate
        chosen.append(c.rate)
    assert chosen == sorted(chosen) and chosen[0] == 0.05 and chosen[-1] == 1.0


def test_prediction_follows_the_measurements(pipe, tmp_path):
    gov = synthetic(pipe.manifest, tmp_path)
    layout = AnyresLayout.for_image(width=1000, height=1000, grid_pinpoints=PINS)
    span = visual_span(layout, HiredConfig(), 0.2)
    assert span == 576
    length = span + 20
    expected = 10 + 100 + 1 + span * 1e-3 + 0.2 * length + 1e-4 * length**2
    got = gov.predict_ms([layout], HiredConfig(), 20, np.array([0.2]))[0]
    assert got == pytest.approx(expected, rel=0.02)


def test_the_safety_factor_follows_a_slower_machine_and_shrugs_off_one_spike(pipe, tmp_path):
    gov = synthetic(pipe.manifest, tmp_path)
    assert gov.safety == pytest.approx(1.0, abs=0.01)
    layout = AnyresLayout.for_image(width=1000, height=1000, grid_pinpoints=PINS)
    target = float(gov.predict_ms([layout], HiredConfig(), 20, np.array([0.5]))[0])
    assert gov.choose([layout], HiredConfig(), text_tokens=20, target_ms=target).rate == pytest.approx(0.5, abs=0.006)
    spans = [150, 600, 1500, 2928, 900, 300] * 2
    gov.observe(n_images=5, span=900, prompt_tokens=920, timings_s=synthetic_ms(900, slow=5.0))  # one burst of load
    assert gov.safety == pytest.approx(1.0, abs=0.02)
    for span in spans:  # the machine now takes 1.3x as long for everything
        gov.observe(n_images=5, span=span, prompt_tokens=span + 20, timings_s=synthetic_ms(span, slow=1.3))
    assert len(gov.ratios) == RATIO_WINDOW and gov.safety > 1.05  # the fits lag the change: k makes up the rest
    slower = gov.choose([layout], HiredConfig(), text_tokens=20, target_ms=target)
    assert slower.rate < 0.45 and slower.predicted_ms <= target
    # what it predicts now is what the slower machine measures at that rate
    span = visual_span(layout, HiredConfig(), slower.rate)
    measured = 1000 * sum(synthetic_ms(span, slow=1.3).values())
    assert slower.predicted_ms == pytest.approx(measured, rel=0.1)


def test_the_safety_factor_drops_when_the_machine_gets_faster(pipe, tmp_path):
    gov = synthetic(pipe.manifest, tmp_path)
    layout = AnyresLayout.for_image(width=1000, height=1000, grid_pinpoints=PINS)
    target = float(gov.predict_ms([layout], HiredConfig(), 20, np.array([0.5]))[0])
    spans = [1500, 900, 300, 2000, 600, 1200, 800, 400, 1000, 1800, 700, 1300]  # other work stopped: 0.4x the time
    for span in spans:
        gov.observe(n_images=5, span=span, prompt_tokens=span + 20, timings_s=synthetic_ms(span, slow=0.4))
    faster = gov.choose([layout], HiredConfig(), text_tokens=20, target_ms=target)
    assert gov.safety < 0.9 and faster.rate > 0.6  # still on the safe side: 0.4x the time would allow 1.0
    assert 1000 * sum(synthetic_ms(visual_span(layout, HiredConfig(), faster.rate), slow=0.4).values()) < target


def test_a_robust_fit_ignores_an_outlier():
    points = [(float(x), 0.2 * x + 1e-4 * x * x) for x in range(100, 3000, 200)]
    points[7] = (points[7][0], 10 * points[7][1])  # one request slowed by a burst of load
    coef = fit_increasing(points, 2, 4000)
    for x, y in points[:7] + points[8:]:
        assert np.polyval(coef, x) == pytest.approx(y, rel=0.03)


def test_the_choice_keeps_the_prompt_within_the_context(pipe, tmp_path):
    gov = synthetic(pipe.manifest, tmp_path)
    layout = AnyresLayout.for_image(width=1000, height=1000, grid_pinpoints=PINS)
    free = gov.choose([layout], HiredConfig(), text_tokens=20, target_ms=1e9)
    assert free.rate == 1.0 and not free.capped
    capped = gov.choose([layout], HiredConfig(), text_tokens=20, target_ms=1e9, max_prompt=1000)
    assert capped.capped and capped.reachable and 20 + visual_span(layout, HiredConfig(), capped.rate) <= 1000
    assert 20 + visual_span(layout, HiredConfig(), capped.rate + 0.005) > 1000
    slow = gov.choose([layout], HiredConfig(), text_tokens=20, target_ms=1.0, max_prompt=1000)
    assert slow.rate == 0.05 and not slow.reachable and not slow.capped


def test_an_increasing_fit_never_has_a_falling_slope():
    coef = fit_increasing([(100, 50.0), (200, 40.0), (300, 60.0)], 2, 4000)
    xs = np.linspace(0, 4000, 50)
    assert np.all(np.diff(np.polyval(coef, xs)) >= -1e-9)


@pytest.mark.parametrize(
    "options, message",
    [
        ({"budget": "auto"}, "budget='auto' needs target_ttft_ms"),
        ({"budget": "auto", "target_ttft_ms": 0}, "target_ttft_ms must be a number of ms > 0"),
        ({"budget": "auto", "target_ttft_ms": -5.0}, "target_ttft_ms must be a number of ms > 0"),
        ({"budget": "auto", "target_ttft_ms": math.nan}, "target_ttft_ms must be a number of ms > 0, got nan"),
        ({"budget": 0.2, "target_ttft_ms": 300}, "target_ttft_ms is read only with budget='auto'"),
        ({"budget": "fast"}, "budget must be a number in (0, 1] or 'auto'"),
    ],
)
def test_bad_auto_requests_are_budget_errors(options, message):
    with pytest.raises(BudgetError) as e:
        RequestOptions.from_kwargs(**options)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_min_budget_is_checked(tiny_bundle):
    with pytest.raises(HiredError, match="min_budget must be a number in"):
        Pipeline.load(tiny_bundle, min_budget=0)


def test_auto_calibrates_lazily_reports_its_choice_and_caches_the_model(tiny_bundle, cache_home, caplog):
    image = scene_array(800, 600)
    with Pipeline.load(tiny_bundle) as p:
        assert not p.governor.calibrated
        generous = p.generate(image, "What is it?", budget="auto", target_ttft_ms=1e6, max_new_tokens=1)
        assert p.governor.calibrated
        b = generous.budget
        assert (b["rate"], b["requested"], b["target_ttft_ms"]) == (1.0, "auto", 1e6) and "note" not in b
        assert b["total"] == int(5 * 576 * 1.0) and b["predicted_ttft_ms"] > 0
        tight = p.generate(image, "What is it?", budget="auto", target_ttft_ms=1e-3, max_new_tokens=1)
        assert tight.budget["rate"] == p.governor.min_budget == 0.05
        assert "below" in tight.budget["note"] and "min_budget" in tight.budget["note"]
        # a target between the two: the choice sits between, and the prediction error is printed
        low, high = tight.budget["predicted_ttft_ms"], generous.budget["predicted_ttft_ms"]
        middle = p.generate(image, "What is it?", budget="auto", target_ttft_ms=(low + high) / 2, max_new_tokens=1)
        assert 0.05 <= middle.budget["rate"] <= 1.0
        for r in (generous, tight, middle):
            print(f"governor: target {r.budget['target_ttft_ms']:.0f} ms -> rate {r.budget['rate']}, predicted "
                  f"{r.budget['predicted_ttft_ms']:.0f} ms, measured {ttft(r):.0f} ms "
                  f"(error {ttft(r) - r.budget['predicted_ttft_ms']:+.0f} ms)")  # fmt: skip
        p.governor.save()
    files = list(cache_home.glob("*.json"))
    assert len(files) == 1
    data = json.loads(files[0].read_text())
    lengths = [x for x, _ in data["prefill"]]
    assert data["vision"] and len(lengths) >= 6
    assert min(lengths) < 100 and max(lengths) > 2300  # calibrated from the prompt alone to the stock span (2,340)
    with Pipeline.load(tiny_bundle) as again:  # the cache makes a new Pipeline ready at once
        assert again.governor.calibrated
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


def test_auto_on_several_images_applies_one_rate_to_each(tiny_bundle, cache_home):
    images, prompt = [scene_array(800, 600), scene_array(450, 1000, seed=1)], "What changed?"
    with Pipeline.load(tiny_bundle) as p:
        generous = p.generate(images, prompt, budget="auto", target_ttft_ms=1e6, max_new_tokens=1)
        assert p.governor.calibrated  # lazily, on this request's two images
        stock = p.generate(images, prompt, budget=1.0, max_new_tokens=1)
        assert generous.budget["rate"] == 1.0 and generous.budget["total"] == stock.budget["total"]
        assert generous.visual_tokens["per_image"] == stock.visual_tokens["per_image"]
        tight = p.generate(images, prompt, budget="auto", target_ttft_ms=1e-3, max_new_tokens=1)
        assert tight.budget["rate"] == 0.05 and "min_budget" in tight.budget["note"]
        fixed = p.generate(images, prompt, budget=0.05, max_new_tokens=1)  # what that rate keeps of each image
        assert tight.budget["total"] == fixed.budget["total"] < stock.budget["total"]
        assert tight.visual_tokens["per_image"] == fixed.visual_tokens["per_image"] and len(fixed.visual_tokens["images"]) == 2
        middle = p.generate(images, prompt, budget="auto", max_new_tokens=1,
                            target_ttft_ms=(tight.budget["predicted_ttft_ms"] + generous.budget["predicted_ttft_ms"]) / 2)  # fmt: skip
        assert 0.05 <= middle.budget["rate"] <= 1.0 and len(middle.visual_tokens["images"]) == 2
        print(f"governor, two images: rate {middle.budget['rate']}, predicted {middle.budget['predicted_ttft_ms']:.0f}"
              f" ms, measured {ttft(middle):.0f} ms")  # fmt: skip


@pytest.mark.parametrize("content", ["{not json", json.dumps({"format": CACHE_FORMAT, "bundle": "other",
                                                                "provider": "CPUExecutionProvider"}),
                                     json.dumps({"format": "hired-edge-governor/1"})])  # fmt: skip
def test_a_corrupt_or_foreign_cache_is_ignored_with_one_warning_and_rebuilt(tiny_bundle, cache_home, caplog, content):
    with Pipeline.load(tiny_bundle) as p:
        path = p.governor.path
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(content)
    with caplog.at_level(logging.WARNING, logger="hired_edge"):
        with Pipeline.load(tiny_bundle) as p:
            assert not p.governor.calibrated
            r = p.generate(scene_array(400, 300), "Hi?", budget="auto", target_ttft_ms=1e6, max_new_tokens=1)
            assert r.budget["requested"] == "auto"
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1 and "ignoring the latency cache" in warnings[0] and "\n" not in warnings[0]
    assert json.loads(path.read_text())["bundle"] != "other"  # rebuilt


def test_auto_caps_the_rate_so_that_max_new_tokens_fit_the_context(tiny_bundle, cache_home):
    image = scene_array(800, 600)  # 5 partitions: 2,340 visual tokens at 1.0
    with Pipeline.load(tiny_bundle, max_context=1500) as p:
        r = p.generate(image, "What is it?", budget="auto", target_ttft_ms=1e6, max_new_tokens=8)
        b = r.budget
        assert 0.05 < b["rate"] < 1.0 and "capped" in b["note"] and "1500-token context" in b["note"]
        assert b["predicted_ttft_ms"] <= 1e6 and len(r.token_ids) >= 1
        at_next = p.hired_config(budget=min(1.0, b["rate"] + 0.005))
        with pytest.raises(HiredError, match="exceeds the 1500-token context"):
            p.generate(image, "What is it?", budget=at_next.rate, max_new_tokens=8)


def test_text_only_auto_request_has_no_visual_tokens_to_trade(pipe):
    r = pipe.generate(None, "Say hi.", budget="auto", target_ttft_ms=100, max_new_tokens=1)
    assert r.budget["requested"] == "auto" and r.budget["predicted_ttft_ms"] is None


def test_cli_takes_budget_auto_target_and_selector(tiny_bundle, tmp_path):
    import os
    import subprocess
    import sys

    from PIL import Image

    img = tmp_path / "img.png"
    Image.fromarray(scene_array(500, 400)).save(img)
    env = {**os.environ, "XDG_CACHE_HOME": str(tmp_path / "cache")}
    args = ["--artifacts", str(tiny_bundle), "--image", str(img), "--prompt", "What?", "--max-new-tokens", "1", "--json"]
    p = subprocess.run([sys.executable, "-m", "runtime.infer", *args, "--budget", "auto", "--target-ttft-ms", "1e6",
                        "--selector", "uniform"], capture_output=True, text=True, env=env, timeout=300)  # fmt: skip
    assert p.returncode == 0, p.stderr
    result = json.loads(p.stdout.strip().splitlines()[-1])
    assert result["selector"] == "uniform" and result["budget"]["requested"] == "auto"
    assert result["budget"]["rate"] == 1.0 and result["budget"]["target_ttft_ms"] == 1e6
    bad = subprocess.run([sys.executable, "-m", "runtime.infer", *args, "--selector", "nope"],
                         capture_output=True, text=True, env=env, timeout=300)  # fmt: skip
    assert bad.returncode == 2
    assert bad.stderr.strip() == "error: selector must be one of hired, cls, uniform, random, visionzip; got 'nope'"


def test_a_pipeline_that_never_asks_for_auto_writes_no_cache(tiny_bundle, cache_home):
    with Pipeline.load(tiny_bundle) as p:
        for _ in range(10):  # more than the observations between cache writes
            p.generate(None, "Hi.", max_new_tokens=1)
        assert p.governor.observations == 10
    assert not cache_home.exists() or not list(cache_home.iterdir())


def test_hindsight_does_not_credit_a_noisy_dip():
    from bench.governor import best_rate, monotone

    assert monotone([100, 300, 200, 400]) == [100, 250, 250, 400]
    grid = (0.1, 0.4, 0.6, 1.0)
    # 0.4 and 0.6 measured 300 and 200 ms: read as 250 each (least squares under TTFT growing with the rate), so a
    # 240 ms target lies between 0.1 and 0.4, not past the dip at 0.6 (0.68 read raw)
    assert best_rate([100, 300, 200, 400], 240, grid) == pytest.approx(0.1 + 0.3 * 140 / 150)
    assert best_rate([100, 300, 200, 400], 280, grid) == pytest.approx(0.6 + 0.4 * 30 / 150)
    assert best_rate([100, 200, 300, 400], 300, grid) == 0.6  # monotone rows are read as measured
