"""The LLM half: prefill on inputs_embeds, then token-by-token decode with the KV cache; greedy or sampled.

    dec = Decoder(session, embed_tokens, manifest.text)
    logits, past = dec.prefill(embeds)                 # embeds: [L, Dt]
    token = pick_token(logits, sampling, rng)
    logits, past = dec.step(token, position=L, past=past)
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from runtime.errors import GenerationError


@dataclass(frozen=True)
class SamplingConfig:
    """max_new_tokens >= 1; temperature 0 = greedy; top_p in (0, 1]; seed for reproducible sampling."""

    max_new_tokens: int = 128
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None

    def __post_init__(self):
        if isinstance(self.max_new_tokens, bool) or not isinstance(self.max_new_tokens, int | np.integer):
            raise GenerationError(f"max_new_tokens must be an integer, got {self.max_new_tokens!r}")
        if self.max_new_tokens < 1:
            raise GenerationError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if not _is_number(self.temperature) or not math.isfinite(self.temperature) or self.temperature < 0:
            raise GenerationError(f"temperature must be a finite number >= 0, got {self.temperature!r}")
        if not _is_number(self.top_p) or not (0 < self.top_p <= 1):
            raise GenerationError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int | np.integer)):
            raise GenerationError(f"seed must be an integer or None, got {self.seed!r}")
        if self.seed is not None and self.seed < 0:
            raise GenerationError(f"seed must be >= 0 (numpy's generators take no negative seeds), got {self.seed!r}")


def _is_number(x) -> bool:
    return isinstance(x, int | float | np.integer | np.floating) and not isinstance(x, bool)


def pick_token(logits: np.ndarray, cfg: SamplingConfig, rng: np.random.Generator) -> int:
    """logits: [V] float32. Greedy = argmax (first index on ties, as torch); else temperature + nucleus sampling."""
    if cfg.temperature == 0:
        return int(np.argmax(logits))
    z = logits.astype(np.float64)
    with np.errstate(over="ignore"):  # a tiny temperature sends all but the top logits to -inf: fine
        z = (z - z.max()) / cfg.temperature  # shift first: max/T may overflow to inf, and inf - inf is NaN
    p = np.exp(z)
    p /= p.sum()
    if cfg.top_p < 1.0:
        order = np.argsort(-p, kind="stable")
        cum = np.cumsum(p[order])
        cut = int(np.searchsorted(cum, cfg.top_p)) + 1  # smallest prefix with mass >= top_p
        keep = order[:cut]
        q = np.zeros_like(p)
        q[keep] = p[keep]
        p = q / q.sum()
    return int(rng.choice(p.shape[0], p=p))
