"""HiRED phase 2: keep each image's top tokens by late-layer attention, within its planned budget.

    keep = select_tokens(late_scores, plan, layout)   # late_scores [1 + n_crops, 576]
    keep[0]  # sorted base-image token indices; keep[1 + i]: crop i's

Ties go to the lower index; kept indices are sorted ascending (raster order). Padding tokens are never
returned: "spatial" (and stock) plans choose among a crop's valid tokens only; "official" plans choose
among all 576, as the published code does, and then drop the padding ones (so they may keep fewer).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from hired.scores import checked_scores, top_k

if TYPE_CHECKING:
    from hired.budget import BudgetPlan
    from hired.layout import AnyresLayout


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
    keep = [top_k(late[0], plan.base)]
    for i, budget in enumerate(plan.crops):
        valid = layout.valid_mask[i]
        if official:
            chosen = top_k(late[1 + i], budget)
            keep.append(chosen[valid[chosen]])
        else:
            keep.append(top_k(late[1 + i], budget, np.flatnonzero(valid)))
    return keep
