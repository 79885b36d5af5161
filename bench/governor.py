"""Does budget="auto" meet a latency target on images of varied size? `make bench`'s governor section.

    python -m bench.governor --artifacts artifacts/tiny [--images 20] [--json out.json]

`images` seeded pictures of varied size and aspect (3 to 5 partitions), two Pipelines on the bundle, each with
its own empty calibration cache: H measures, G is governed.
1. The target: H runs every 4th image at budget 0.1 and 1.0 (one new token); the target is halfway between the
   median TTFTs.
2. G runs `calibrate()`. Then image by image: G asks once with budget="auto" and the target; right after, H runs
   the same image at every rate of GRID, which gives the best rate in hindsight under the same machine load (the
   grid's TTFTs made non-decreasing in the rate, as TTFT is, so one noisy dip does not count; then the largest
   rate within the target, linear between grid rates) and the image's TTFT at 0.1 and 1.0.
Reported: the share of G's requests whose measured TTFT is within 1.1x the target, G's mean chosen rate against the
mean best rate in hindsight, the prediction error (mean absolute; median measured / predicted - 1; per stage, the
median measured / model before the safety factor), and the median TTFTs at 0.1 and 1.0 (the target must lie
between them). G learns from its own requests only, as a deployed Pipeline does.
TTFT = preprocess + vision + select + projector + prefill (the runtime's own stage timings).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

GRID = (0.1, 0.25, 0.4, 0.6, 0.8, 1.0)
SIZES = ((640, 480), (480, 640), (1000, 1000), (1280, 720), (720, 1280), (336, 336), (800, 300), (300, 800),
         (1024, 768), (2000, 1000), (500, 500), (1200, 400), (400, 1200), (900, 600), (600, 900), (1500, 1500),
         (700, 350), (350, 700), (1100, 800), (256, 256))  # fmt: skip  (width, height)
TTFT_STAGES = ("preprocess", "vision", "select", "projector", "prefill")
PROMPT = "What is in the picture?"
WITHIN = 1.1  # a request meets the target when its TTFT is at most 1.1x it


def ttft_ms(result) -> float:
    return float(sum(result.timings_ms[k] for k in TTFT_STAGES))


def picture(width: int, height: int, seed: int) -> np.ndarray:
    """A seeded uint8 [height, width, 3] scene: smooth gradients plus a few blocks (compresses like a photo)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    img = np.stack([x / width * 255, y / height * 255, np.full_like(x, rng.uniform(40, 200))], axis=-1)
    for _ in range(6):
        x0, y0 = int(rng.integers(0, width)), int(rng.integers(0, height))
        img[y0 : y0 + height // 5, x0 : x0 + width // 5] = rng.uniform(0, 255, 3)
    return img.astype(np.uint8)


def monotone(values: Sequence[float]) -> list[float]:
    """The non-decreasing sequence nearest `values` in least squares (pool adjacent violators): TTFT grows with the
    rate, so a dip measured at a higher rate is noise, and taking it at face value would credit hindsight with a
    rate its own lower neighbour missed."""
    blocks: list[list[float]] = []  # [mean, count]
    for v in values:
        blocks.append([float(v), 1.0])
        while len(blocks) > 1 and blocks[-2][0] > blocks[-1][0]:
            (m1, c1), (m2, c2) = blocks.pop(-2), blocks.pop()
            blocks.append([(m1 * c1 + m2 * c2) / (c1 + c2), c1 + c2])
    return [m for m, c in blocks for _ in range(int(c))]


def best_rate(ttfts: Sequence[float], target: float, grid: Sequence[float] = GRID) -> float:
    """The largest rate whose TTFT meets `target`, from TTFTs measured at `grid` (ascending), made monotone first:
    the last grid rate within it, then linear toward the next one; the lowest grid rate when none is."""
    ttfts = monotone(ttfts)
    k = max((i for i, t in enumerate(ttfts) if t <= target), default=None)
    if k is None:
        return float(grid[0])
    if k == len(grid) - 1:
        return float(grid[-1])
    t0, t1 = ttfts[k], ttfts[k + 1]
    frac = 0.0 if t1 <= t0 else min(1.0, (target - t0) / (t1 - t0))
    return float(grid[k] + frac * (grid[k + 1] - grid[k]))


def governor_section(bundle: str | os.PathLike, *, images: int = 20, provider: str = "cpu",
                     threads: int | None = None, log: Callable[[str], None] = print) -> dict:  # fmt: skip
    """The numbers of the governor section (see the module docstring)."""
    from runtime.pipeline import Pipeline

    sizes = [SIZES[i % len(SIZES)] for i in range(images)]
    frames = [picture(w, h, seed=i) for i, (w, h) in enumerate(sizes)]
    old = os.environ.get("XDG_CACHE_HOME")
    with tempfile.TemporaryDirectory(prefix="hired-governor-") as cache:
        try:
            os.environ["XDG_CACHE_HOME"] = os.path.join(cache, "hindsight")
            h = Pipeline.load(bundle, provider=provider, threads=threads)
            os.environ["XDG_CACHE_HOME"] = os.path.join(cache, "governed")
            g = Pipeline.load(bundle, provider=provider, threads=threads)
            with h, g:
                h.generate(frames[0], PROMPT, budget=0.1, max_new_tokens=1)  # warm-up
                probe = [[ttft_ms(h.generate(f, PROMPT, budget=r, max_new_tokens=1)) for r in (GRID[0], GRID[-1])]
                         for f in frames[::4]]  # fmt: skip
                target = (float(np.median([p[0] for p in probe])) + float(np.median([p[1] for p in probe]))) / 2
                log(f"governor: target {target:,.0f} ms; calibrating a fresh Pipeline, then per image budget='auto' "
                    f"and the {len(GRID)} hindsight rates ...")  # fmt: skip
                t0 = time.perf_counter()
                g.calibrate()
                calibration_s = time.perf_counter() - t0
                runs, table = [], []
                for f in frames:
                    r = g.generate(f, PROMPT, budget="auto", target_ttft_ms=target, max_new_tokens=1)
                    row = [ttft_ms(h.generate(f, PROMPT, budget=rate, max_new_tokens=1)) for rate in GRID]
                    table.append(row)
                    check = g.governor.last_check or {}  # the model's stage times for this request, before it learnt
                    runs.append({"size": list(f.shape[1::-1]), "rate": r.budget["rate"], "ttft_ms": ttft_ms(r),
                                 "predicted_ms": r.budget["predicted_ttft_ms"], "best_rate": best_rate(row, target),
                                 "partitions": len(r.visual_tokens["per_image"]), "k": check.get("k"),
                                 "model_ms": check.get("model"), "measured_ms": check.get("measured")})  # fmt: skip
        finally:
            if old is None:
                os.environ.pop("XDG_CACHE_HOME", None)
            else:
                os.environ["XDG_CACHE_HOME"] = old
    low = float(np.median([row[0] for row in table]))
    high = float(np.median([row[-1] for row in table]))
    within = float(np.mean([r["ttft_ms"] <= WITHIN * target for r in runs]))
    chosen, best = float(np.mean([r["rate"] for r in runs])), float(np.mean([r["best_rate"] for r in runs]))
    error = float(np.mean([abs(r["ttft_ms"] - r["predicted_ms"]) for r in runs]))
    bias = float(np.median([r["ttft_ms"] / r["predicted_ms"] - 1 for r in runs]))
    stages = {k: float(np.median([r["measured_ms"][k] / max(r["model_ms"][k], 1e-9) for r in runs if r["model_ms"]]))
              for k in ("vision", "projector", "prefill")} if any(r["model_ms"] for r in runs) else {}  # fmt: skip
    return {"images": images, "grid": list(GRID), "target_ms": target, "ttft_ms_at_0.1": low, "ttft_ms_at_1.0": high,
            "within_1.1x": within, "mean_rate": chosen, "mean_best_rate": best, "rate_ratio": chosen / best,
            "mean_abs_prediction_error_ms": error, "median_prediction_bias": bias,
            "median_stage_ratio": stages, "calibration_s": calibration_s, "runs": runs,
            "hindsight_ttft_ms": table}  # fmt: skip


def section_lines(g: dict, model: str) -> list[str]:
    """The markdown of the governor section."""
    met = "met" if g["within_1.1x"] >= 0.9 else "NOT met"
    ratio_met = "met" if g["rate_ratio"] >= 0.9 else "NOT met"
    return [
        f"{g['images']} images of varied size and aspect on {model}; target {g['target_ms']:,.0f} ms (median TTFT "
        f"over the images at budget 0.1: {g['ttft_ms_at_0.1']:,.0f} ms, at 1.0: {g['ttft_ms_at_1.0']:,.0f} ms"
        f"{'' if g['ttft_ms_at_0.1'] < g['target_ms'] < g['ttft_ms_at_1.0'] else ': the target is NOT between them'}); "
        f"calibration {g['calibration_s']:.1f} s",
        "",
        f"- within 1.1x the target: {g['within_1.1x']:.0%} of requests (target >= 90%: {met})",
        f"- mean chosen rate {g['mean_rate']:.3f} vs best in hindsight {g['mean_best_rate']:.3f}: "
        f"{g['rate_ratio']:.2f}x (target >= 0.9x: {ratio_met})",
        f"- mean |measured - predicted| TTFT: {g['mean_abs_prediction_error_ms']:,.0f} ms (median measured / "
        f"predicted - 1: {g['median_prediction_bias']:+.1%}; the model before its safety factor, median measured / "
        f"model per stage: " + ", ".join(f"{k} {v:.2f}" for k, v in g["median_stage_ratio"].items()) + ")",
    ]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.governor", description=__doc__.splitlines()[0])
    p.add_argument("--artifacts", required=True, help="bundle folder")
    p.add_argument("--images", type=int, default=20, help="images of varied size (default 20)")
    p.add_argument("--provider", default="cpu")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--json", default=None, help="also write the numbers here")
    args = p.parse_args(argv)
    g = governor_section(args.artifacts, images=args.images, provider=args.provider, threads=args.threads,
                         log=lambda m: print(m, file=sys.stderr))  # fmt: skip
    print("\n".join(section_lines(g, Path(args.artifacts).name)))
    for i, r in enumerate(g["runs"]):
        print(f"  {r['size'][0]}x{r['size'][1]} ({r['partitions']} partitions): rate {r['rate']:.3f} (best "
              f"{r['best_rate']:.3f}), TTFT {r['ttft_ms']:,.0f} ms, predicted {r['predicted_ms']:,.0f} ms, k "
              f"{r['k'] or 0:.2f}; hindsight " + " ".join(f"{t:,.0f}" for t in g["hindsight_ttft_ms"][i]))  # fmt: skip
    if args.json:
        Path(args.json).write_text(json.dumps(g, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
