"""RequestOptions: every per-request option of `Pipeline.generate`/`stream`, defined once with defaults and checks.

    opts = RequestOptions.from_kwargs(budget=0.2, max_new_tokens=np.int64(32))   # checked, Python numbers only
    cfg = opts.hired_config(defaults)          # HiredConfig, the manifest's defaults filling the Nones
    opts.sampling                              # SamplingConfig(max_new_tokens, min_new_tokens, temperature, top_p, seed)

Every surface derives from this type: `Pipeline.generate`'s keywords, the CLI flags, the wire protocol's option
keys (`RequestOptions.names()`), `RemotePipeline.generate` and the OpenAI front door's `hired` object. Numeric
options are converted to Python `int`/`float` here, before any arithmetic, so a numpy integer near its type's
maximum cannot wrap a later sum (the context check adds prompt length and `max_new_tokens`).
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, fields, replace
from typing import Any

from hired import HiredConfig
from hired.selectors import SELECTORS
from runtime.errors import BudgetError, GenerationError, ImageError
from runtime.image import COLOR_ORDERS

AUTO = "auto"  # budget="auto": runtime.governor picks the rate


@dataclass(frozen=True)
class SamplingConfig:
    """How new tokens are picked and when decoding stops (checked by RequestOptions).

    max_new_tokens: stop after this many new tokens (>= 1; EOS stops earlier unless min_new_tokens says otherwise).
    min_new_tokens: EOS is not picked before this many tokens (0 = never forced; benchmarks force a length).
    temperature:    0 = greedy (argmax, first index on ties, as torch); > 0 samples.
    top_p:          nucleus mass in (0, 1].
    seed:           the request's random generator seed (None = fresh entropy).
    """

    max_new_tokens: int = 128
    min_new_tokens: int = 0
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None


@dataclass(frozen=True)
class RequestOptions:
    """One request's options. None for a HiRED option takes the bundle manifest's default."""

    budget: float | str | None = None  # rate: fraction of the visual tokens kept, in (0, 1]; 1.0 = stock model;
    # "auto": the largest rate whose predicted time to first token meets target_ttft_ms (runtime.governor)
    alpha: float | None = None  # the base image's share of the budget, in [0, 1]
    distribution: str | None = None  # "spatial" (the paper's Eq. 1) or "official" (the published code)
    newlines: str | None = None  # "none" (HiRED) or "rows"
    selector: str = "hired"  # which tokens the budget keeps: hired.selectors.SELECTORS
    target_ttft_ms: float | None = None  # with budget="auto": the time to first token to meet, in ms
    max_new_tokens: int = 128
    min_new_tokens: int = 0
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    color: str = "rgb"  # channel order of numpy array images: "rgb" or "bgr" (camera frames)

    def __post_init__(self) -> None:
        set_ = object.__setattr__
        if self.budget is not None and not (isinstance(self.budget, str) and self.budget == AUTO):
            set_(self, "budget", _finite(self.budget, "budget", BudgetError, what="a number in (0, 1] or 'auto'"))
        if self.alpha is not None:
            set_(self, "alpha", _finite(self.alpha, "alpha", BudgetError))
        if not isinstance(self.selector, str) or self.selector not in SELECTORS:
            raise BudgetError(f"selector must be one of {', '.join(SELECTORS)}; got {_show(self.selector)}")
        if self.target_ttft_ms is not None:
            target = _finite(self.target_ttft_ms, "target_ttft_ms", BudgetError, what="a number of ms > 0")
            if target <= 0:
                raise BudgetError(f"target_ttft_ms must be a number of ms > 0, got {_show(self.target_ttft_ms)}")
            set_(self, "target_ttft_ms", target)
        if self.budget == AUTO and self.target_ttft_ms is None:
            raise BudgetError("budget='auto' needs target_ttft_ms, the time to first token to meet in ms, e.g. 300")
        if self.target_ttft_ms is not None and self.budget != AUTO:
            raise BudgetError(f"target_ttft_ms is read only with budget='auto', got budget={_show(self.budget)}")
        for name in ("distribution", "newlines"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, str):
                raise BudgetError(f"{name} must be a string, got {_show(value)}")
        set_(self, "max_new_tokens", _integer(self.max_new_tokens, "max_new_tokens", low=1))
        set_(self, "min_new_tokens", _integer(self.min_new_tokens, "min_new_tokens", low=0))
        for name in ("max_new_tokens", "min_new_tokens"):  # token counts: later messages print them
            if getattr(self, name) >= 1 << 63:
                raise GenerationError(f"{name} must be below 2**63, got {_show(getattr(self, name))}")
        if self.min_new_tokens > self.max_new_tokens:
            raise GenerationError(
                f"min_new_tokens ({self.min_new_tokens}) must not exceed max_new_tokens ({self.max_new_tokens})"
            )
        temperature = _finite(self.temperature, "temperature", GenerationError)
        if temperature < 0:
            raise GenerationError(f"temperature must be a finite number >= 0, got {_show(self.temperature)}")
        set_(self, "temperature", temperature)
        top_p = _finite(self.top_p, "top_p", GenerationError, what="in (0, 1]")
        if not 0 < top_p <= 1:
            raise GenerationError(f"top_p must be in (0, 1], got {_show(self.top_p)}")
        set_(self, "top_p", top_p)
        if self.seed is not None:
            seed = _integer(self.seed, "seed", low=0, kind="an integer or None")
            if seed >= 1 << 128:
                raise GenerationError(f"seed must be below 2**128, got a {seed.bit_length()}-bit integer")
            set_(self, "seed", seed)
        if not isinstance(self.color, str) or self.color not in COLOR_ORDERS:
            raise ImageError(f"color must be 'rgb' or 'bgr', got {_show(self.color)}")

    # ---- construction ----------------------------------------------------------------------------------
    @classmethod
    def names(cls) -> tuple[str, ...]:
        """The option keywords, in declaration order (the wire protocol's option keys derive from this)."""
        return tuple(f.name for f in fields(cls))

    @classmethod
    def from_kwargs(cls, **options: Any) -> RequestOptions:
        """Options from keywords; an unknown keyword is a GenerationError listing the known ones."""
        unknown = sorted(set(options) - set(cls.names()))
        if unknown:
            raise GenerationError(
                f"unknown option(s) {', '.join(unknown)}; the options are {', '.join(cls.names())}"
            )
        return cls(**options)

    def replace(self, **changes: Any) -> RequestOptions:
        return replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in self.names()}

    # ---- views -----------------------------------------------------------------------------------------
    @property
    def is_auto(self) -> bool:
        """budget="auto": the rate is chosen per request to meet target_ttft_ms."""
        return self.budget == AUTO

    def hired_config(self, defaults: HiredConfig, *, rate: float | None = None) -> HiredConfig:
        """The HiRED knobs of this request; `defaults` (the manifest's) fill the Nones. BudgetError if out of range.

        `rate` replaces the budget (the governor's choice under budget="auto"; until then "auto" reads as 1.0)."""
        if rate is None:
            rate = defaults.rate if self.budget is None else 1.0 if self.is_auto else self.budget
        try:
            cfg = HiredConfig(
                rate=rate,
                alpha=defaults.alpha if self.alpha is None else self.alpha,
                distribution=defaults.distribution if self.distribution is None else self.distribution,
                newlines=defaults.newlines if self.newlines is None else self.newlines,
            )
        except (ValueError, TypeError) as e:
            raise BudgetError(str(e)) from None
        if cfg.distribution == "official" and self.selector != "hired":
            raise BudgetError(
                f'distribution="official" is HiRED\'s published split; use it with selector="hired", or '
                f'distribution="spatial" with selector={self.selector!r}'
            )
        return cfg

    @property
    def sampling(self) -> SamplingConfig:
        return SamplingConfig(
            max_new_tokens=self.max_new_tokens,
            min_new_tokens=self.min_new_tokens,
            temperature=self.temperature,
            top_p=self.top_p,
            seed=self.seed,
        )


def _finite(value: Any, name: str, error: type, what: str = "a finite number") -> float:
    """A real number (Python or numpy, not bool) as a Python float, or `error` naming the option."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise error(f"{name} must be {what}, got {_show(value)}")
    try:
        out = float(value)
    except (OverflowError, ValueError):  # an int too large for a float
        raise error(f"{name} must be {what}, got an out-of-range number") from None
    if not math.isfinite(out):
        raise error(f"{name} must be {what}, got {_show(value)}")
    return out


def _integer(value: Any, name: str, *, low: int, kind: str = "an integer") -> int:
    """An integer (Python or numpy, not bool) as a Python int >= low, or GenerationError naming the option."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise GenerationError(f"{name} must be {kind}, got {_show(value)}")
    out = int(value)  # numpy scalars become Python ints: later sums cannot wrap
    if out < low:
        raise GenerationError(f"{name} must be >= {low}, got {_show(out)}")
    return out


def _show(value: Any) -> str:
    """repr for messages, safe for a 5,000-digit integer (whose str() raises) and long strings."""
    if isinstance(value, numbers.Integral) and not isinstance(value, bool) and abs(int(value)).bit_length() > 64:
        return f"a {abs(int(value)).bit_length()}-bit integer"
    try:
        text = repr(value)
    except RecursionError:  # a list or dict nested thousands of levels deep
        return f"a {type(value).__name__} nested too deeply to print"
    return text if len(text) <= 80 else text[:77] + "..."
