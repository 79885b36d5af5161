"""bench/: the ideal-speedup formula, the selection overhead, the stage-table runner on the tiny bundle,
decoding a fixed length (min_new_tokens), the PyTorch comparison and the GPU check on tiny/CPU."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from bench.__main__ import build_parser, bundle_for, overhead_share, parse_args, run
from bench.images import parse_size, synthetic_image
from bench.metrics import ideal_speedup, speedups, summarize_runs, ttft_ms
from bench.overhead import NUMPY_PEER, selection_overhead_us

REPO = Path(__file__).resolve().parent.parent
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


# ---------------------------------------------------------------------------------------------- pure numbers


@pytest.mark.parametrize(
    ("vision", "prefill", "kept", "full", "expected"),
    [
        (100.0, 900.0, 600, 3000, 1000.0 / 280.0),  # 100 + 900 * 0.2 = 280
        (0.0, 500.0, 300, 3000, 10.0),  # no vision cost: the token ratio itself
        (250.0, 750.0, 3000, 3000, 1.0),  # nothing dropped: no speed-up
        (1000.0, 0.0, 10, 3000, 1.0),  # all time in vision: dropping tokens cannot help
    ],
)
def test_ideal_speedup_matches_hand_computed_values(vision, prefill, kept, full, expected):
    got = ideal_speedup(
        vision_ms=vision, prefill_full_ms=prefill, kept_tokens_total=kept, full_tokens_total=full
    )
    assert got == pytest.approx(expected, rel=1e-12)


def test_ideal_speedup_refuses_empty_totals_and_zero_times():
    with pytest.raises(ValueError, match="token totals"):
        ideal_speedup(vision_ms=1, prefill_full_ms=1, kept_tokens_total=10, full_tokens_total=0)
    with pytest.raises(ValueError, match="stage times"):
        ideal_speedup(vision_ms=0, prefill_full_ms=0, kept_tokens_total=10, full_tokens_total=20)


def test_speedups_compare_each_budget_with_the_same_images_full_budget_row():
    rows = [
        {
            "image": "A",
            "budget": 1.0,
            "ttft_ms": 1200.0,
            "vision_ms": 200.0,
            "prefill_ms": 900.0,
            "prefill_tokens": 3000,
        },
        {
            "image": "A",
            "budget": 0.2,
            "ttft_ms": 400.0,
            "vision_ms": 200.0,
            "prefill_ms": 150.0,
            "prefill_tokens": 600,
        },
        {
            "image": "B",
            "budget": 0.2,
            "ttft_ms": 100.0,
            "vision_ms": 50.0,
            "prefill_ms": 40.0,
            "prefill_tokens": 300,
        },
    ]
    out = speedups(rows)
    assert [(s["image"], s["budget"]) for s in out] == [("A", 1.0), ("A", 0.2)]  # B has no 1.0 row
    assert out[1]["measured"] == pytest.approx(3.0)
    assert out[1]["ideal"] == pytest.approx(1100.0 / (200.0 + 900.0 * 600 / 3000))
    assert out[1]["ratio"] == pytest.approx(out[1]["measured"] / out[1]["ideal"])


def test_ttft_is_the_sum_of_the_five_stages_before_the_first_token():
    t = {"preprocess": 1.0, "vision": 2.0, "select": 0.5, "projector": 3.0, "prefill": 10.0, "decode": 99.0}
    assert ttft_ms(t) == 16.5
    with pytest.raises(KeyError, match="prefill"):
        ttft_ms({k: v for k, v in t.items() if k != "prefill"})


def test_summarize_runs_takes_medians_of_numbers_and_skips_the_rest():
    runs = [{"a": 1.0, "n": 5, "s": "x"}, {"a": 3.0, "n": 5, "s": "y"}, {"a": 2.0, "n": 7, "s": "z"}]
    assert summarize_runs(runs) == {"a": 2.0, "n": 5.0}
    with pytest.raises(ValueError, match="--runs"):
        summarize_runs([])


def test_selection_overhead_is_a_positive_number_of_microseconds():
    us = selection_overhead_us(calls=50)
    assert math.isfinite(us) and 0 < us < 1e6
    share = overhead_share(us, [{"image": "1000x1000", "budget": 0.2, "per_image": [1] * 5, "ttft_ms": 2000.0,
                                 "select_ms": 1.0}])  # fmt: skip
    assert share["share"] == pytest.approx(us / 1000.0 / 2000.0)


def test_image_sizes_parse_width_first_and_images_are_deterministic():
    assert parse_size("1280x640") == (1280, 640)
    with pytest.raises(ValueError, match="WIDTHxHEIGHT"):
        parse_size("1280*640")
    a, b = synthetic_image(width=64, height=32), synthetic_image(width=64, height=32)
    assert a.shape == (32, 64, 3) and a.dtype == np.uint8 and np.array_equal(a, b)


def test_registry_name_wins_over_the_bench_package_folder(tmp_path):
    # `bench` is both a registry model and this package's folder in the repository root.
    assert bundle_for("bench", tmp_path) == (tmp_path / "bench", None)


def test_help_explains_every_flag(capsys):
    with pytest.raises(SystemExit) as stop:
        parse_args(["--help"])
    assert stop.value.code == 0
    text = capsys.readouterr().out
    for flag in ("--model", "--bundle", "--budgets", "--images", "--runs", "--warmup", "--new-tokens", "--quick",
                 "--skip-torch", "--threads", "--overhead-calls", "--out", "--force-export", "--artifacts", "--prompt"):  # fmt: skip
        assert flag in text
    undocumented = [a.dest for a in build_parser()._actions if not (a.help or "").strip()]
    assert undocumented == []


# ---------------------------------------------------------------------------------------------- tiny bundle


def test_min_new_tokens_makes_exactly_n_tokens_and_agrees_with_the_pipeline_until_eos(pipe):
    # the stage table decodes exactly new_tokens tokens through min_new_tokens (bench.stages.measure_request)
    from bench.stages import measure_request

    image = synthetic_image(width=1280, height=640)
    r = pipe.generate(image, "What is this?", budget=0.2, max_new_tokens=6)
    forced = pipe.generate(image, "What is this?", budget=0.2, max_new_tokens=6, min_new_tokens=6)
    assert len(forced.token_ids) == 6
    eos = pipe.manifest.tokens.eos
    n = len(r.token_ids) - (r.token_ids[-1] == eos)  # the pipeline stops at EOS; min_new_tokens holds it off
    assert forced.token_ids[:n] == r.token_ids[:n]
    run_ = measure_request(pipe, image, "What is this?", 0.2, 6)
    assert run_["decode_ms"] > 0 and run_["decode_tok_s"] > 0 and run_["kept"] == r.visual_tokens["kept"]
    assert run_["prefill_tokens"] == run_["kept"] + run_["text_tokens"]


def test_stage_table_on_the_tiny_bundle_writes_rows_json_and_png(tiny_bundle, tmp_path, capsys):
    budgets = (1.0, 0.4, 0.2, 0.1)
    args = parse_args(["--bundle", str(tiny_bundle), "--quick", "--skip-torch", "--out", str(tmp_path),
                       "--images", "1000x1000", "--budgets", ",".join(map(str, budgets)), "--threads", "1"])  # fmt: skip
    results = run(args)
    rows = results["rows"]
    assert [r["budget"] for r in rows] == list(budgets)
    kept = [r["kept"] for r in rows]
    assert kept == sorted(kept, reverse=True) and len(set(kept)) == len(kept), kept
    assert kept[0] == rows[0]["before"] == 2928  # budget 1.0 is the stock span of a 2x2 grid
    for r in rows:
        assert r["prefill_tokens"] == r["kept"] + r["text_tokens"]
        assert r["ttft_ms"] == pytest.approx(sum(r[f"{s}_ms"] for s in ("preprocess", "vision", "select",
                                                                           "projector", "prefill")))  # fmt: skip
        assert r["decode_tok_s"] > 0 and r["peak_rss_mb"] > 0 and r["runs"] == 1
    pngs, jsons = list(tmp_path.glob("*.png")), list(tmp_path.glob("*.json"))
    assert len(pngs) == 1 and pngs[0].read_bytes()[:8] == PNG_MAGIC
    data = json.loads(jsons[0].read_text())
    assert [r["kept"] for r in data["rows"]] == kept
    assert len(data["stage_runs"]) == len(budgets) and data["selection_overhead"]["median_us"] > 0
    assert [s["budget"] for s in data["speedups"]] == list(budgets)
    out = capsys.readouterr().out
    assert "| 1000x1000 | 0.2 |" in out and str(pngs[0]) in out and str(jsons[0]) in out
    per = data["selection_overhead"]["per_selector_us"]
    assert set(per) == {"hired", "cls", "uniform", "random", "visionzip", NUMPY_PEER} and min(per.values()) > 0
    g = data["governor"]
    assert g["images"] == 2 and len(g["runs"]) == 2 and 0 <= g["within_1.1x"] <= 1 and g["mean_rate"] > 0
    assert "| visionzip |" in out and f"| {NUMPY_PEER} (peer) |" in out and "same turns:" in out and "## Governor" in out and "within 1.1x the target" in out


def test_torch_side_times_transformers_and_the_reference_on_the_bundles_own_weights(tiny_bundle):
    from bench.torch_side import measure

    rec = measure(
        str(tiny_bundle), [(1280, 640)], runs=1, warmup=0, new_tokens=3, reference_budget=0.2, threads=1
    )
    assert rec["same_weights"] is True
    by_name = {c["baseline"]: c for c in rec["cases"]}
    stock, ref = by_name["transformers"], by_name["reference"]
    assert stock["budget"] == 1.0 and ref["budget"] == 0.2
    assert stock["ttft_ms"] > 0 and stock["decode_tok_s"] > 0 and ref["decode_tok_s"] > 0
    assert ref["kept"] == 345  # int(3 * 576 * 0.2) of a 1x2 grid, all of it kept
    assert ref["prefill_tokens"] < stock["prefill_tokens"]


def test_gpu_check_runs_on_cpu_with_the_tiny_shape_and_writes_its_table_under_out(tmp_path):
    env = {**os.environ, "OUT": str(tmp_path), "PYTHON": sys.executable}
    proc = subprocess.run(
        ["bash", str(REPO / "bench" / "gpu_check.sh"), "--model", "tiny", "--device", "cpu", "--runs", "1",
         "--warmup", "0", "--new-tokens", "3", "--threads", "1"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads((tmp_path / "gpu_check.json").read_text())
    assert [r["budget"] for r in result["rows"]] == [1.0, 0.4, 0.2]
    assert [int(r["kept"]) for r in result["rows"]] == [2928, 1152, 576]
    assert all(r["new_tokens"] == 3 and r["ttft_ms"] > 0 and r["peak_mem_gb"] > 0 for r in result["rows"])
    table = (tmp_path / "gpu_check.md").read_text()
    assert "| 0.2 | 576 |" in table and "tiny" in table


def test_best_rate_in_hindsight_interpolates_between_grid_rates():
    from bench.governor import best_rate

    grid = (0.1, 0.5, 1.0)
    assert best_rate([100, 200, 400], 300, grid) == pytest.approx(0.75)  # halfway from 200 to 400 ms
    assert best_rate([100, 200, 400], 500, grid) == 1.0
    assert best_rate([100, 200, 400], 50, grid) == 0.1  # none meets it: the lowest rate
    assert best_rate([100, 200, 400], 200, grid) == 0.5
