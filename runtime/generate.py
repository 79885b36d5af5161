"""The generate loop, in one place: prefill -> decode -> stop, as token ids and as streamed text pieces.

    gen = Generation(decoder, embeds, sampling, eos=manifest.tokens.eos)    # embeds: [L, Dt]
    for token in gen: ...                        # new token ids; gen.prefill_logits [V], gen.prefill_s, gen.decode_s
    pieces = stream_text(gen, prompt.decode, eos)                # text pieces; its return value is the full text

Stops at EOS (included in the ids), after `max_new_tokens`, or when `cancelled()` turns true between two
decoder steps (`cancel_error()` is raised). Before `min_new_tokens` tokens EOS cannot be picked (its logit is
masked), so a benchmark gets exactly the length it asks for. The decoder is runtime.decoder.Decoder (or anything
with its `prefill(embeds, max_new_tokens=) -> (logits, cache)` and `step(token, position, cache) -> (logits, cache)`).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Generator, Iterable, Iterator

import numpy as np

from runtime.options import SamplingConfig

__all__ = ["Generation", "SamplingConfig", "pick_token", "stream_text"]


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


def _without(logits: np.ndarray, token: int) -> np.ndarray:
    """A copy of logits [V] in which `token` can never be picked (greedy or sampled)."""
    out = logits.astype(np.float32, copy=True)
    if 0 <= token < out.shape[0]:
        out[token] = -np.inf
    return out


class Generation:
    """One request's token loop. Iterate once: prefill runs at the first `next()`, then one decoder step per token.

    decoder:   prefill(embeds [L, Dt], max_new_tokens=) -> (logits [V], cache); step(token, position, cache)
    sampling:  max_new_tokens, min_new_tokens, temperature, top_p, seed (runtime.options.SamplingConfig)
    eos:       the end-of-sequence id (stops the loop; never picked before min_new_tokens)
    cancelled: called between decoder steps; when it returns True, `cancel_error()` is raised
    After the loop: `ids` (EOS included when produced), `prefill_logits`, `prefill_s`, `decode_s` (seconds
    from the first pick to the last token, detokenizing included when the caller does it per token).
    """

    def __init__(
        self,
        decoder,
        embeds: np.ndarray,
        sampling: SamplingConfig,
        *,
        eos: int,
        cancelled: Callable[[], bool] | None = None,
        cancel_error: Callable[[], BaseException] | None = None,
    ):
        self.decoder = decoder
        self.embeds = embeds
        self.sampling = sampling
        self.eos = int(eos)
        self._cancelled = cancelled
        self._cancel_error = cancel_error
        self.ids: list[int] = []
        self.prefill_logits: np.ndarray | None = None
        self.prefill_s = 0.0
        self.decode_s = 0.0

    def _check(self) -> None:
        if self._cancelled is not None and self._cancelled():
            raise self._cancel_error() if self._cancel_error else RuntimeError("generation cancelled")

    def __iter__(self) -> Iterator[int]:
        s = self.sampling
        t = time.perf_counter()
        logits, past = self.decoder.prefill(self.embeds, max_new_tokens=s.max_new_tokens)  # sizes the KV cache
        self.prefill_s = time.perf_counter() - t
        self.prefill_logits = logits
        rng = np.random.default_rng(s.seed)
        position = int(self.embeds.shape[0])
        t0 = time.perf_counter()
        try:
            while True:
                self._check()
                masked = _without(logits, self.eos) if len(self.ids) < s.min_new_tokens else logits
                token = pick_token(masked, s, rng)
                self.ids.append(token)
                yield token
                if token == self.eos or len(self.ids) >= s.max_new_tokens:
                    return
                self._check()
                logits, past = self.decoder.step(token, position, past)
                position += 1
        finally:
            self.decode_s = time.perf_counter() - t0


def stream_text(tokens: Iterable[int], decode: Callable[[list[int]], str], eos: int) -> Generator[str, None, str]:
    """Text pieces of a token stream as soon as they are whole characters; returns the full text (EOS left out).

    `decode(ids)` is the tokenizer's ids -> text. A piece is yielded only when the text so far grew by whole
    characters (no trailing U+FFFD of a half-decoded byte sequence) and still starts with what was shown."""
    ids: list[int] = []
    shown = ""
    for token in tokens:
        if token == eos:
            continue
        ids.append(token)
        text = decode(ids)
        if not text.endswith("\ufffd") and len(text) > len(shown) and text.startswith(shown):
            yield text[len(shown) :]
            shown = text
    text = decode(ids)
    if text.startswith(shown) and len(text) > len(shown):
        yield text[len(shown) :]
    return text
