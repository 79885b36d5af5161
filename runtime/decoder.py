"""The decoder graph runner: prefill on inputs_embeds, then one call per new token, carrying the KV cache.

    dec = Decoder(session, embed_tokens, manifest.text)
    logits, past = dec.prefill(embeds)                 # embeds: [L, Dt] -> last-position logits [V]
    logits, past = dec.step(token, position=L, past=past)

The decode loop (stop conditions, sampling) lives in runtime.generate.
"""

from __future__ import annotations

import numpy as np

from runtime.manifest import TextSpec


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
