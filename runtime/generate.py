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
from runtime.manifest import TextSpec


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


class Decoder:
    """Runs decoder.onnx: one prefill call, then one call per new token, carrying presents as the next past.

    `session`: a runtime.session.OrtSession (or anything with its inputs/outputs/run/dtype surface)."""

    def __init__(self, session, embed_tokens: np.ndarray, text: TextSpec):
        self.session = session
        self.embed_tokens = embed_tokens  # [V, Dt]
        self.text = text
        io = session.inputs
        self._embeds, self._mask, self._pos = io["inputs_embeds"], io["attention_mask"], io["position_ids"]
        self._past = [(io["past_key"].format(i=i), io["past_value"].format(i=i)) for i in range(text.num_layers)]
        out = session.outputs
        self._outputs = [out["logits"]] + [
            n for i in range(text.num_layers) for n in (out["present_key"].format(i=i), out["present_value"].format(i=i))
        ]
        self._kv_dtype = session.dtype(self._past[0][0]) if self._past else np.float32

    def empty_past(self) -> list[np.ndarray]:
        shape = (1, self.text.num_kv_heads, 0, self.text.head_dim)
        return [np.zeros(shape, dtype=self._kv_dtype) for _ in range(2 * self.text.num_layers)]

    def _run(self, embeds: np.ndarray, start: int, past: list[np.ndarray]) -> tuple[np.ndarray, list[np.ndarray]]:
        s = embeds.shape[0]
        feeds = {
            self._embeds: embeds[None],
            self._mask: np.ones((1, start + s), dtype=np.int64),
            self._pos: np.arange(start, start + s, dtype=np.int64)[None],
        }
        for (k, v), i in zip(self._past, range(0, 2 * len(self._past), 2)):
            feeds[k], feeds[v] = past[i], past[i + 1]
        outs = self.session.run(feeds, self._outputs)
        return outs[0].reshape(-1).astype(np.float32), outs[1:]

    def prefill(self, embeds: np.ndarray) -> tuple[np.ndarray, list[np.ndarray]]:
        """embeds: [L, Dt] -> (last-position logits [V], KV cache)."""
        return self._run(embeds, 0, self.empty_past())

    def step(self, token: int, position: int, past: list[np.ndarray]) -> tuple[np.ndarray, list[np.ndarray]]:
        """One new token at `position` (= tokens already in the cache)."""
        return self._run(self.embed_tokens[token][None], position, past)
