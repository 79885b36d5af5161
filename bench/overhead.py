"""What HiRED's selection itself costs: plan_budget + select_tokens + pack_tokens, timed alone.

    from bench.overhead import selection_overhead_us, selector_overheads_us
    us = selection_overhead_us(calls=1000)   # median microseconds per request, 1000x1000 image (2x2 grid, 5 images)
    per = selector_overheads_us(calls=1000)  # {"hired": us, "cls": us, ..., "visionzip": us}, same case

    python -m bench.overhead [--calls 1000] [--feature-dtype fp32|fp16]   # the per-selector table alone

The scores are random, positive float32, as the vision graph gives them; the features (visionzip reads them) are
random, of CLIP-L's width 1024, in the bundle's dtype (fp32 bundles by default; fp16 ones, such as the streamed
7B, give fp16 features). Per selector it times runtime.selection.select_stage, what a request pays.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Sequence

import numpy as np

from bench.metrics import median
from export.bundle import numpy_dtype
from export.defaults import BUNDLE_DTYPES
from hired import AnyresLayout, HiredConfig, pack_tokens, plan_budget, select_tokens
from hired.selectors import SELECTORS, nearest_target
from runtime.selection import select_stage

# LLaVA-NeXT's five (height, width) pinpoints, as in every llava-v1.6 config.
LLAVA_NEXT_PINPOINTS: tuple[tuple[int, int], ...] = (
    (336, 672),
    (672, 336),
    (672, 672),
    (1008, 336),
    (336, 1008),
)
N_SCORE_SETS = 8  # distinct random score sets cycled through, so no call sees the previous call's input
FEATURE_DIM = 1024  # CLIP-L/14-336's feature width: what visionzip's similarity grouping reads
TARGETS_US = {"visionzip": 2000.0}  # issue 14's targets: visionzip <= 2 ms, every other selector <= 0.5 ms
DEFAULT_TARGET_US = 500.0
BLOCK = 50  # calls of one selector back to back before the next selector's turn
NUMPY_PEER = "visionzip, numpy search"  # the peer row: visionzip with hired.selectors.nearest_target (numpy's BLAS)


def select_once(layout: AnyresLayout, early: np.ndarray, late: np.ndarray, cfg: HiredConfig) -> np.ndarray:
    """One request's selection: plan from the base image's early scores [576], top-k on late [n, 576], pack.

    Returns the packed order (image_index * 576 + token, or NEWLINE), as the pipeline feeds the projector.
    """
    plan = plan_budget(layout, early, cfg)
    keep = select_tokens(late, plan, layout)
    return pack_tokens(keep, layout, cfg)


def selection_overhead_us(
    calls: int = 1000,
    *,
    width: int = 1000,
    height: int = 1000,
    rate: float = 0.2,
    alpha: float = 0.5,
    grid_pinpoints: Sequence[Sequence[int]] = LLAVA_NEXT_PINPOINTS,
    seed: int = 0,
) -> float:
    """Median wall time in microseconds of `select_once` over `calls` calls (after one untimed call).

    The default 1000x1000 image gives a 2x2 grid: 5 images of 576 tokens (the paper's benchmark shape).
    """
    if calls < 1:
        raise ValueError(f"calls must be >= 1, got {calls}")
    layout = AnyresLayout.for_image(width=width, height=height, grid_pinpoints=grid_pinpoints)
    cfg = HiredConfig(rate=rate, alpha=alpha)
    rng = np.random.default_rng(seed)
    n, t = layout.n_images, layout.tokens_per_image
    sets = [
        (rng.random(t, dtype=np.float32) + 1e-3, rng.random((n, t), dtype=np.float32) + 1e-3)
        for _ in range(N_SCORE_SETS)
    ]
    select_once(layout, *sets[0], cfg)  # warm-up: first-call imports and caches
    times = []
    for i in range(calls):
        early, late = sets[i % N_SCORE_SETS]
        t0 = time.perf_counter_ns()
        select_once(layout, early, late, cfg)
        times.append((time.perf_counter_ns() - t0) / 1000.0)
    return median(times)


def selector_overheads_us(
    calls: int = 1000,
    *,
    selectors: Sequence[str] = SELECTORS,
    width: int = 1000,
    height: int = 1000,
    rate: float = 0.2,
    grid_pinpoints: Sequence[Sequence[int]] = LLAVA_NEXT_PINPOINTS,
    feature_dim: int = FEATURE_DIM,
    feature_dtype: str = "fp32",
    seed: int = 0,
    numpy_peer: bool = True,
) -> dict[str, float]:
    """Median microseconds of plan + select + pack per selector (runtime.selection.select_stage: the selector,
    visionzip's similarity search on onnxruntime, pack_tokens) over `calls` calls each, after one untimed call.
    Each selector is timed alone, BLOCK calls back to back; the selectors take turns block by block, so a busy
    spell of the machine hits them all alike, but no selector's calls follow another's (visionzip streams the
    11.8 MB of features through the caches, which would slow the next selector's small-array work).
    feature_dtype: the bundle's dtype ("fp32" or "fp16"), the features' as the vision graph returns them. The
    merged tokens' feature means (the projector stage's) are not included. numpy_peer (with visionzip): one more
    entry, NUMPY_PEER, visionzip with numpy's similarity search instead of onnxruntime's, timed in the same turns."""
    if calls < 1:
        raise ValueError(f"calls must be >= 1, got {calls}")
    if feature_dtype not in BUNDLE_DTYPES:
        raise ValueError(f"feature_dtype must be one of {', '.join(BUNDLE_DTYPES)}, got {feature_dtype!r}")
    layout = AnyresLayout.for_image(width=width, height=height, grid_pinpoints=grid_pinpoints)
    cfg = HiredConfig(rate=rate)
    rng = np.random.default_rng(seed)
    n, t = layout.n_images, layout.tokens_per_image
    sets = [
        (rng.random((n, t), dtype=np.float32) + 1e-3, rng.random((n, t), dtype=np.float32) + 1e-3,
         rng.standard_normal((n, t, feature_dim), dtype=np.float32).astype(numpy_dtype(feature_dtype)))
        for _ in range(N_SCORE_SETS)
    ]  # fmt: skip

    def once(name: str, i: int) -> None:
        early, late, feats = sets[i % N_SCORE_SETS]
        if name == NUMPY_PEER:
            select_stage(layout, cfg, "visionzip", i, feats, early, late, nearest_target)
        else:
            select_stage(layout, cfg, name, i, feats, early, late)

    selectors = [*selectors, NUMPY_PEER] if numpy_peer and "visionzip" in selectors else list(selectors)
    times: dict[str, list[float]] = {name: [] for name in selectors}
    for name in selectors:
        once(name, 0)  # warm-up
    for first in range(0, calls, BLOCK):
        for name in selectors:
            for i in range(first, min(first + BLOCK, calls)):
                t0 = time.perf_counter_ns()
                once(name, i)
                times[name].append((time.perf_counter_ns() - t0) / 1000.0)
    return {name: median(v) for name, v in times.items()}


def overhead_lines(per: dict[str, float], calls: int, feature_dtype: str = "fp32") -> list[str]:
    """A markdown table of per-selector medians against issue 14's targets."""
    out = ["| selector | median us | target us | met |", "|---|---:|---:|---|"]
    for name, us in per.items():
        if name == NUMPY_PEER:
            out.append(f"| {name} (peer) | {us:,.0f} | | |")
            continue
        target = TARGETS_US.get(name, DEFAULT_TARGET_US)
        out.append(f"| {name} | {us:,.0f} | {target:,.0f} | {'yes' if us <= target else 'NO'} |")
    if NUMPY_PEER in per and "visionzip" in per:
        out.append(f"\nvisionzip's similarity search on onnxruntime vs numpy's BLAS, same turns: "
                   f"{per[NUMPY_PEER] / per['visionzip']:.2f}x faster")  # fmt: skip
    out.append(f"\n(median of {calls:,} calls each, in turns of {BLOCK}; plan + select + pack, 1000x1000 image -> 5 images of 576 tokens, "
               f"{feature_dtype} features {FEATURE_DIM} wide)")  # fmt: skip
    return out


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m bench.overhead", description="Time every token selector alone "
                                "(plan + select + pack, 1000x1000 image -> 5 images of 576 tokens), as make bench does.")  # fmt: skip
    p.add_argument("--calls", type=int, default=1000, help="timed calls per selector [1000]")
    p.add_argument("--feature-dtype", choices=BUNDLE_DTYPES, default="fp32",
                   help="the bundle's dtype, which the vision graph's features have [fp32]")  # fmt: skip
    args = p.parse_args(argv)
    if args.calls < 1:
        p.error("need --calls >= 1")
    per = selector_overheads_us(args.calls, feature_dtype=args.feature_dtype)
    print("\n".join(overhead_lines(per, args.calls, args.feature_dtype)))


if __name__ == "__main__":
    main()
