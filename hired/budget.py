"""HiRED phase 1: share an image's token budget between its base image and its crops.

    plan = plan_budget(layout, base_early_scores, HiredConfig(rate=0.2, alpha=0.5))
    plan.base, plan.crops, plan.kept

The budget is T = int(n * 576 * rate) for n = 1 + crops images; the base image gets
B = min(int(T * alpha), 576) and the crops share S = T - B.

- "spatial" (the paper's Eq. 1, this project's default): crop i's score is the base image's early-layer
  attention summed over the base tokens whose centre lies in crop i; S, capped at what the crops can hold
  after unpadding, is shared in proportion to the scores with each crop capped at its capacity
  (water-filling), rounded by largest remainder; what no crop can take goes back to the base image.
  The kept count is exactly min(T, 576 + sum of capacities).
- "official" (the published code): a crop's score is its count of the top-K base tokens
  (K = int(576 * (1 - alpha))) in the i-th of n - 1 flat raster bands; its budget is
  int(f32(f32(count / K) * S')) with S' = min(S, (n - 1) * 576), capped at 576; no redistribution.

An image of one partition (LLaVA-1.5, n = 1) keeps T = int(576 * rate) tokens under both distributions.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from fractions import Fraction

import numpy as np

from hired.config import HiredConfig
from hired.layout import AnyresLayout
from hired.scores import checked_scores, top_k


@dataclass(frozen=True)
class BudgetPlan:
    """Tokens to keep per image: `base` for the base image, `crops[i]` for crop i (row-major).

    total:        T, the requested budget.
    distribution: how the crops' share was split ("spatial" or "official").
    stock:        True at rate 1.0: every valid token is kept and packed the stock way.
    """

    total: int
    base: int
    crops: tuple[int, ...]
    distribution: str
    stock: bool = False

    @property
    def kept(self) -> int:
        """Planned kept tokens: base + sum(crops) (official plans may lose some to padding)."""
        return self.base + sum(self.crops)


def requested_total(n_images: int, tokens_per_image: int, rate: float) -> int:
    """T = int(n * 576 * rate), the expression of the official code."""
    return int(n_images * tokens_per_image * rate)


def base_share(total: int, alpha: float, tokens_per_image: int) -> int:
    """B = min(int(T * alpha), 576)."""
    return min(int(total * alpha), tokens_per_image)


def crop_scores(base_early_scores: np.ndarray, base_to_crop: np.ndarray, n_crops: int) -> np.ndarray:
    """float64 [n_crops]: the base image's early scores [576] summed over the base tokens each crop holds."""
    return np.bincount(base_to_crop, weights=base_early_scores, minlength=n_crops)


def water_fill(amount: int, scores: np.ndarray, capacities: np.ndarray) -> list[Fraction]:
    """Exact shares of `amount` in proportion to `scores` [n], none above `capacities` [n].

    Crops whose proportional share reaches their capacity take their capacity and the rest is re-shared
    among the others; when the others' scores are all zero, in proportion to their capacities.
    Requires amount <= sum(capacities). Rational arithmetic, so equal scores get exactly equal shares: each score
    is an exact integer over one common power-of-two denominator, so crop i's share is the fraction
    remaining * weights[i] / sum(open weights) of integers.
    """
    caps = [int(c) for c in capacities]
    ratios = [float(s).as_integer_ratio() for s in scores]  # exact: (numerator, power-of-two denominator)
    scale = max((den for _, den in ratios), default=1)
    weights = [num * (scale // den) for num, den in ratios]  # scores * scale, exact integers
    shares = [Fraction(0)] * len(caps)
    remaining = int(amount)
    open_ = [i for i, cap in enumerate(caps) if cap > 0]
    while open_ and remaining > 0:
        basis = weights if sum(weights[i] for i in open_) > 0 else caps
        denominator = sum(basis[i] for i in open_)
        full = [i for i in open_ if remaining * basis[i] >= caps[i] * denominator]  # share >= capacity
        if not full:
            for i in open_:
                shares[i] = Fraction(remaining * basis[i], denominator)
            break
        for i in full:
            shares[i] = Fraction(caps[i])
            remaining -= caps[i]
        open_ = [i for i in open_ if i not in full]
    return shares


def largest_remainder(shares: list[Fraction]) -> list[int]:
    """Integers summing to sum(shares) (an integer): floors, plus one for the largest remainders.

    Ties go to the lower index.
    """
    floors = [s.numerator // s.denominator for s in shares]
    common = math.lcm(*(s.denominator for s in shares))  # remainder i = remainders[i] / common, exactly
    remainders = [s.numerator % s.denominator * (common // s.denominator) for s in shares]
    missing = sum(remainders) // common
    by_remainder = sorted(range(len(shares)), key=lambda i: (-remainders[i], i))
    for i in by_remainder[:missing]:
        floors[i] += 1
    return floors


def spatial_split(
    crop_budget: int, scores: np.ndarray, capacities: np.ndarray
) -> tuple[tuple[int, ...], int]:
    """(per-crop budgets, leftover): S shared by water-filling and largest remainder; leftover = S - taken."""
    fillable = min(crop_budget, int(capacities.sum()))
    crops = largest_remainder(water_fill(fillable, scores, capacities))
    return tuple(crops), crop_budget - fillable


def hot_set(base_early_scores: np.ndarray, k: int) -> np.ndarray:
    """bool [576]: the top-k base tokens by early score (ties to the lower index)."""
    hot = np.zeros(base_early_scores.shape[0], dtype=bool)
    hot[top_k(base_early_scores, k)] = True
    return hot


def band_counts(hot: np.ndarray, n_bands: int) -> np.ndarray:
    """int64 [n_bands]: hot tokens in each of n_bands flat raster bands of 576 / n_bands tokens."""
    if hot.shape[0] % n_bands:
        raise ValueError(
            f'distribution="official" needs the number of crops ({n_bands}) to divide {hot.shape[0]}; '
            'use distribution="spatial" for this grid'
        )
    return hot.reshape(n_bands, -1).sum(axis=1).astype(np.int64)


def official_split(
    base_early_scores: np.ndarray, n_crops: int, crop_budget: int, alpha: float, tokens_per_image: int
) -> tuple[int, ...]:
    """Per-crop budgets of the published code: int(f32(f32(count / K) * S')), each capped at 576."""
    sub_total = min(crop_budget, n_crops * tokens_per_image)
    hot_k = int(tokens_per_image * (1 - alpha))
    counts = band_counts(hot_set(base_early_scores, hot_k), n_crops)
    if sub_total <= 0 or hot_k == 0:
        return (0,) * n_crops
    s = np.float32(sub_total)
    return tuple(min(int(np.float32(np.float32(int(c) / hot_k) * s)), tokens_per_image) for c in counts)


def plan_budget(layout: AnyresLayout, base_early_scores: object, cfg: HiredConfig) -> BudgetPlan:
    """The budget plan of one image from its base image's early-layer scores [576].

    Raises ValueError for scores of the wrong shape, not finite or negative, and for
    distribution="official" on a grid whose crop count does not divide 576.
    """
    tokens = layout.tokens_per_image
    dtype = np.float32 if cfg.distribution == "official" else np.float64
    early = checked_scores(base_early_scores, (tokens,), "base_early_scores", dtype)
    total = requested_total(layout.n_images, tokens, cfg.rate)
    if layout.n_crops == 0:  # one partition (LLaVA-1.5): the whole budget to it, whatever the distribution
        return BudgetPlan(total, min(total, tokens), (), cfg.distribution, stock=cfg.is_stock)
    if cfg.is_stock:
        return BudgetPlan(
            total, tokens, tuple(int(c) for c in layout.capacities), cfg.distribution, stock=True
        )
    base = base_share(total, cfg.alpha, tokens)
    if cfg.distribution == "official":
        crops = official_split(early, layout.n_crops, total - base, cfg.alpha, tokens)
        return BudgetPlan(total, base, crops, cfg.distribution)
    scores = crop_scores(early, layout.base_to_crop, layout.n_crops)
    crops, leftover = spatial_split(total - base, scores, layout.capacities)
    return BudgetPlan(total, min(base + leftover, tokens), crops, cfg.distribution)
