"""What HiRED's selection itself costs: plan_budget + select_tokens + pack_tokens, timed alone.

    from bench.overhead import selection_overhead_us
    us = selection_overhead_us(calls=1000)   # median microseconds per request, 1000x1000 image (2x2 grid, 5 images)

numpy only (the `hired` package); the scores are random, positive float32, as the vision graph gives them.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import numpy as np

from bench.metrics import median
from hired import AnyresLayout, HiredConfig, pack_tokens, plan_budget, select_tokens

# LLaVA-NeXT's five (height, width) pinpoints, as in every llava-v1.6 config.
LLAVA_NEXT_PINPOINTS: tuple[tuple[int, int], ...] = (
    (336, 672),
    (672, 336),
    (672, 672),
    (1008, 336),
    (336, 1008),
)
N_SCORE_SETS = 8  # distinct random score sets cycled through, so no call sees the previous call's input


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
