"""The decoder graph runner: prefill on inputs_embeds, then one call per new token, with the request's KV cache.

    dec = Decoder(session, embed_tokens, manifest.text)
    logits, cache = dec.prefill(embeds, max_new_tokens=32)  # embeds: [L, Dt] -> last-position logits [V]
    logits, cache = dec.step(token, position=L, cache=cache)  # the same cache object, one token longer

Two graph forms, told apart by the graph's own metadata (`hired_edge.kv_cache`, written by export/decoder.py):
- "shared-buffer" (opset 23 bundles, GroupQueryAttention): the cache is 2 x layers OrtValues
  [1, kv, L + max_new_tokens, hd] on the session's device, allocated once per request; every call binds each past
  input and its present output to the same OrtValue (onnxruntime IO binding), so a step writes only the new
  position in place. inputs_embeds go to the device once (prefill); per step the token's embedding row, the mask
  and the position go in and only the last position's logits [V] come back to the host.
- "concat" (opset 18 bundles, older bundles, test stand-ins without metadata): numpy in, numpy out, each step's
  presents (one position longer) are the next step's past.

The decode loop (stop conditions, sampling) lives in runtime.generate.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from runtime.errors import GenerationError
from runtime.manifest import TextSpec

KV_CACHE_KEY = "hired_edge.kv_cache"
SHARED = "shared-buffer"
CONCAT = "concat"
# Shared-buffer prefill runs in chunks of at most this many rows, each attending to the cache so far:
# GroupQueryAttention's CPU kernel computes (and allocates) every chunk's full [s, cache] score matrix, so
# chunks skip most of the causal upper triangle (a 2,950-token prefill on `bench`: 0.79x the time of one call,
# 0.92x the old block-causal graph; 1 thread, CPU time, medians of 6) and bound that buffer (12 heads x 512 x
# cache floats instead of 12 x 2,950 x cache).
PREFILL_CHUNK = 512

# onnxruntime provider -> the OrtValue device its kernels read (TensorRT leaves GroupQueryAttention to CUDA)
_DEVICES = {"CUDAExecutionProvider": "cuda", "TensorrtExecutionProvider": "cuda"}


def cache_device(providers: list[str], device_id: int = 0) -> tuple[str, int]:
    """(device, id) where the KV cache lives for a session whose providers are `providers` (first = preferred):
    CUDA memory under the CUDA or TensorRT provider, CPU memory otherwise."""
    first = providers[0] if providers else "CPUExecutionProvider"
    name = _DEVICES.get(first, "cpu")
    return name, (device_id if name != "cpu" else 0)


@dataclass
class KVCache:
    """One request's KV cache. `length`: positions written; `capacity`: positions it can hold.

    Shared-buffer graphs: `values` are 2 x layers OrtValues [1, kv, capacity, hd] (k0, v0, k1, v1, ...) that stay
    where they are for the whole request. Concat graphs: `values` are numpy arrays [1, kv, length, hd]."""

    values: list
    capacity: int
    length: int = 0
    device: tuple[str, int] = ("cpu", 0)
    _mask: np.ndarray | None = field(default=None, repr=False)  # ones [1, capacity], sliced per call
    _logits: object = field(default=None, repr=False)  # an OrtValue [1, 1, V] on the host
    _binding: object = field(default=None, repr=False)  # the request's onnxruntime IO binding

    def data_ptrs(self) -> list[int]:
        """Addresses of the cache buffers (shared-buffer form): the same for the whole request."""
        return [v.data_ptr() for v in self.values]


class Decoder:
    """Runs decoder.onnx for one request at a time per cache; any number of caches may be in flight at once.

    `session`: a runtime.session.OrtSession (or anything with its inputs/outputs/run/dtype surface; without
    `metadata()`/`session` it is driven in the concat form)."""

    def __init__(self, session, embed_tokens: np.ndarray, text: TextSpec):
        self.session = session
        self.embed_tokens = embed_tokens  # [V, Dt]
        self.text = text
        io = session.inputs
        self._embeds, self._mask, self._pos = io["inputs_embeds"], io["attention_mask"], io["position_ids"]
        self._past = [(io["past_key"].format(i=i), io["past_value"].format(i=i)) for i in range(text.num_layers)]
        out = session.outputs
        self._logits = out["logits"]
        self._present = [
            (out["present_key"].format(i=i), out["present_value"].format(i=i)) for i in range(text.num_layers)
        ]
        self._outputs = [self._logits] + [n for pair in self._present for n in pair]
        self._kv_dtype = session.dtype(self._past[0][0]) if self._past else np.float32
        meta = session.metadata() if hasattr(session, "metadata") else {}
        self.kv_cache = meta.get(KV_CACHE_KEY, CONCAT)
        if self.kv_cache not in (SHARED, CONCAT):
            raise GenerationError(f"decoder graph declares an unknown KV cache form {self.kv_cache!r}; re-export it")
        self.device = cache_device(session.session.get_providers()) if self.kv_cache == SHARED else ("cpu", 0)

    # ---- the cache ---------------------------------------------------------------------------------------
    def new_cache(self, capacity: int) -> KVCache:
        """An empty cache for `capacity` positions (prompt + max_new_tokens); allocated here, once."""
        if capacity > self.text.max_position_embeddings:
            raise GenerationError(
                f"a request of {capacity} tokens (prompt + max_new_tokens) exceeds the decoder's "
                f"{self.text.max_position_embeddings}-token context; shorten the prompt or lower max_new_tokens"
            )
        t = self.text
        if self.kv_cache == CONCAT:
            shape = (1, t.num_kv_heads, 0, t.head_dim)
            return KVCache([np.zeros(shape, dtype=self._kv_dtype) for _ in range(2 * t.num_layers)], capacity)
        import onnxruntime as ort

        shape = (1, t.num_kv_heads, capacity, t.head_dim)
        device, index = self.device
        values = [
            ort.OrtValue.ortvalue_from_shape_and_type(shape, self._kv_dtype, device, index)
            for _ in range(2 * t.num_layers)
        ]
        logits = ort.OrtValue.ortvalue_from_shape_and_type((1, 1, t.vocab_size), np.float32, "cpu", 0)
        return KVCache(values, capacity, 0, self.device, np.ones((1, capacity), np.int64), logits)

    def empty_past(self) -> list[np.ndarray]:
        """A zero-length past in the concat form (what the graph takes for a prefill without a bound cache)."""
        shape = (1, self.text.num_kv_heads, 0, self.text.head_dim)
        return [np.zeros(shape, dtype=self._kv_dtype) for _ in range(2 * self.text.num_layers)]

    # ---- calls --------------------------------------------------------------------------------------------
    def prefill(
        self, embeds: np.ndarray, max_new_tokens: int = 128, cache: KVCache | None = None
    ) -> tuple[np.ndarray, KVCache]:
        """embeds: [L, Dt] -> (last-position logits [V], the request's cache, sized L + max_new_tokens).

        GenerationError, before any graph runs, when L + max_new_tokens exceeds the model's context."""
        if cache is None:
            cache = self.new_cache(embeds.shape[0] + int(max_new_tokens))
        if self.kv_cache == CONCAT:
            return self._run(embeds, 0, cache), cache
        n = embeds.shape[0]
        size = -(-n // -(-n // PREFILL_CHUNK))  # equal chunks of at most PREFILL_CHUNK rows
        for lo in range(0, n, size):
            logits = self._run(embeds[lo : lo + size], lo, cache)
        return logits, cache

    def step(self, token: int, position: int, cache: KVCache) -> tuple[np.ndarray, KVCache]:
        """One new token at `position` (= tokens already in the cache); the cache is written in place."""
        if position != cache.length:
            raise GenerationError(f"decoder step at position {position}, but the cache holds {cache.length} tokens")
        return self._run(self.embed_tokens[token][None], position, cache), cache

    def _run(self, embeds: np.ndarray, start: int, cache: KVCache) -> np.ndarray:
        s = embeds.shape[0]
        if start + s > cache.capacity:
            raise GenerationError(
                f"the KV cache holds {cache.capacity} tokens (prompt + max_new_tokens); position {start + s - 1} "
                "is past it"
            )
        if self.kv_cache == SHARED:
            logits = self._run_bound(embeds, start, cache)
        else:
            logits = self._run_concat(embeds, start, cache)
        cache.length = start + s
        return logits

    def _run_concat(self, embeds: np.ndarray, start: int, cache: KVCache) -> np.ndarray:
        s = embeds.shape[0]
        feeds = {
            self._embeds: embeds[None],
            self._mask: np.ones((1, start + s), dtype=np.int64),
            self._pos: np.arange(start, start + s, dtype=np.int64)[None],
        }
        for (k, v), i in zip(self._past, range(0, 2 * len(self._past), 2)):
            feeds[k], feeds[v] = cache.values[i], cache.values[i + 1]
        outs = self.session.run(feeds, self._outputs)
        cache.values = outs[1:]
        return outs[0].reshape(-1).astype(np.float32)

    def _run_bound(self, embeds: np.ndarray, start: int, cache: KVCache) -> np.ndarray:
        s = embeds.shape[0]
        binding = cache._binding
        if binding is None:  # once per request: the cache buffers and the logits stay bound
            binding = cache._binding = self.session.io_binding()
            for (pk, pv), (ok, ov), i in zip(self._past, self._present, range(0, 2 * len(self._past), 2)):
                binding.bind_ortvalue_input(pk, cache.values[i])
                binding.bind_ortvalue_input(pv, cache.values[i + 1])
                binding.bind_ortvalue_output(ok, cache.values[i])  # the same buffer: written in place
                binding.bind_ortvalue_output(ov, cache.values[i + 1])
            binding.bind_ortvalue_output(self._logits, cache._logits)
        device, index = cache.device
        x = np.ascontiguousarray(embeds[None], dtype=self._kv_dtype)
        if device == "cpu":
            binding.bind_cpu_input(self._embeds, x)
        else:  # one copy to the device per call: the whole prompt once at prefill, one row per step
            import onnxruntime as ort

            binding.bind_ortvalue_input(self._embeds, ort.OrtValue.ortvalue_from_numpy(x, device, index))
        binding.bind_cpu_input(self._mask, cache._mask[:, : start + s])
        binding.bind_cpu_input(self._pos, np.arange(start, start + s, dtype=np.int64)[None])
        self.session.run_with_binding(binding)
        return cache._logits.numpy().reshape(-1).copy()
