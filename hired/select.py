"""HiRED phase 2: keep each image's top tokens by late-layer attention, within its planned budget.

    keep = select_tokens(late_scores, plan, layout)   # late_scores [1 + n_crops, 576]
    keep[0]  # sorted base-image token indices; keep[1 + i]: crop i's

Ties go to the lower index; kept indices are sorted ascending (raster order). Padding tokens are never
returned: "spatial" (and stock) plans choose among a crop's valid tokens only; "official" plans choose
among all 576, as the published code does, and then drop the padding ones (so they may keep fewer).
"""

from __future__ import annotations

from functools import lru_cache
from typing import TYPE_CHECKING

import numpy as np

from hired.scores import checked_scores, top_k

if TYPE_CHECKING:
    from hired.budget import BudgetPlan
    from hired.layout import AnyresLayout


@lru_cache(maxsize=64)
def candidate_mask(layout: AnyresLayout) -> np.ndarray:
    """bool [1 + n_crops, 576]: the tokens that survive unpadding, base image first (all of it); read-only, cached."""
    mask = np.concatenate([np.ones((1, layout.tokens_per_image), dtype=bool), layout.valid_mask])
    mask.setflags(write=False)
    return mask


def _check_plan(plan: BudgetPlan, layout: AnyresLayout) -> None:
    if len(plan.crops) != layout.n_crops:
        raise ValueError(
            f"plan has {len(plan.crops)} crop budgets but the layout has {layout.n_crops} crops; "
            "build the plan with plan_budget on the same layout"
        )
    if not 0 <= plan.base <= layout.tokens_per_image:
        raise ValueError(f"plan.base must be in [0, {layout.tokens_per_image}], got {plan.base}")
    limits = layout.capacities if plan.distribution == "spatial" or plan.stock else None
    for i, budget in enumerate(plan.crops):
        limit = layout.tokens_per_image if limits is None else int(limits[i])
        if not 0 <= budget <= limit:
            raise ValueError(f"plan.crops[{i}] = {budget} is outside [0, {limit}] for this layout")


def top_k_mask(scores: np.ndarray, ks: np.ndarray, candidates: np.ndarray) -> np.ndarray:
    """bool [n, m]: per row i, True at the ks[i] highest scores [n, m] (>= 0) among the row's candidates (bool
    [n, m]); ties to the lower index. top_k on every row at once: the kept are the scores above the row's k-th
    highest, then the lowest-index ones equal to it. Requires ks[i] <= the row's candidates.
    """
    n, m = scores.shape
    masked = np.where(candidates, scores, -1.0)  # below every candidate's score
    kth = np.sort(masked, axis=1)[np.arange(n), np.minimum(m - ks, m - 1)]
    kth = np.where(ks > 0, kth, np.inf)  # k = 0: nothing reaches it
    above = masked > kth[:, None]
    ties = masked == kth[:, None]
    need = ks - above.sum(axis=1)  # ties taken, lowest index first
    return above | (ties & (np.cumsum(ties, axis=1) <= need[:, None]))


def top_k_rows(scores: np.ndarray, ks: np.ndarray, candidates: np.ndarray) -> list[np.ndarray]:
    """Per row i, int64 [ks[i]]: the sorted indices of top_k_mask's row i (the ks[i] highest candidate scores)."""
    return [np.flatnonzero(row) for row in top_k_mask(scores, ks, candidates)]


def select_tokens(late_scores: object, plan: BudgetPlan, layout: AnyresLayout) -> list[np.ndarray]:
    """Kept token indices per image, base first: a list of 1 + n_crops sorted int64 arrays.

    late_scores: [1 + n_crops, 576] late-layer CLS attention of the base image then each crop
    (row-major), finite and >= 0, else ValueError.
    """
    official = plan.distribution == "official" and not plan.stock
    dtype = np.float32 if official else np.float64
    shape = (layout.n_images, layout.tokens_per_image)
    late = checked_scores(late_scores, shape, "late_scores", dtype)
    _check_plan(plan, layout)
    if not official:  # every image at once, among its valid tokens
        return top_k_rows(late, np.array((plan.base, *plan.crops)), candidate_mask(layout))
    keep = [top_k(late[0], plan.base)]
    for i, budget in enumerate(plan.crops):
        chosen = top_k(late[1 + i], budget)
        keep.append(chosen[layout.valid_mask[i][chosen]])
    return keep
