"""HiredConfig: the four HiRED knobs (rate, alpha, distribution, newlines), checked once."""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

DISTRIBUTIONS = ("spatial", "official")
NEWLINE_MODES = ("none", "rows")


def _real(value: object, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(float(value)):
        raise ValueError(f"{what} must be a finite number, got {value!r}")
    return float(value)


@dataclass(frozen=True)
class HiredConfig:
    """How much of an image to keep and how to share it.

    rate:         fraction of the n * 576 patch tokens of an image (base + crops) to keep, in (0, 1];
                  1.0 is the stock model (no dropping, stock newlines).
    alpha:        fraction of the kept tokens given to the base image (capped at one image), in [0, 1].
    distribution: "spatial" (the paper's Eq. 1, exact budgets) or "official" (the published code).
    newlines:     "none" (HiRED's packing) or "rows" (a newline after each canvas row that keeps a token).
    """

    rate: float = 0.2
    alpha: float = 0.5
    distribution: str = "spatial"
    newlines: str = "none"

    def __post_init__(self) -> None:
        rate = _real(self.rate, "rate")
        if not 0.0 < rate <= 1.0:
            raise ValueError(
                f"rate must be in (0, 1], got {self.rate!r}; it is the fraction of visual tokens kept, e.g. 0.2"
            )
        alpha = _real(self.alpha, "alpha")
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(
                f"alpha must be in [0, 1], got {self.alpha!r}; it is the base image's share of the budget, e.g. 0.5"
            )
        if self.distribution not in DISTRIBUTIONS:
            raise ValueError(f"distribution must be one of {DISTRIBUTIONS}, got {self.distribution!r}")
        if self.newlines not in NEWLINE_MODES:
            raise ValueError(f"newlines must be one of {NEWLINE_MODES}, got {self.newlines!r}")
        object.__setattr__(self, "rate", rate)
        object.__setattr__(self, "alpha", alpha)

    @property
    def is_stock(self) -> bool:
        """True at rate 1.0: the stock LLaVA-NeXT span, whatever the other options say."""
        return self.rate == 1.0
