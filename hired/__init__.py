"""HiRED visual-token dropping for LLaVA-NeXT, in numpy: layout geometry, budget plan, top-k, packing.

layout = AnyresLayout.for_image(width=w, height=h, grid_pinpoints=pins)
plan = plan_budget(layout, base_early_scores, HiredConfig(rate=0.2, alpha=0.5))
keep = select_tokens(late_scores, plan, layout)
order = pack_tokens(keep, layout, cfg)   # image_index * 576 + token, or NEWLINE
"""

from hired.budget import BudgetPlan, plan_budget
from hired.config import DISTRIBUTIONS, NEWLINE_MODES, HiredConfig
from hired.layout import AnyresLayout
from hired.pack import NEWLINE, pack_tokens
from hired.scores import top_k
from hired.select import select_tokens

__all__ = [
    "DISTRIBUTIONS",
    "NEWLINE",
    "NEWLINE_MODES",
    "AnyresLayout",
    "BudgetPlan",
    "HiredConfig",
    "pack_tokens",
    "plan_budget",
    "select_tokens",
    "top_k",
]
