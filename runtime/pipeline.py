"""The Python API: image + prompt -> HiRED-pruned LLaVA-NeXT answer, on onnxruntime only.

    from runtime import Pipeline
    with Pipeline.load("artifacts/tiny") as p:
        r = p.generate(frame, "What is on the table?", budget=0.2)      # -> GenerationResult
        for piece in p.stream(frame, "Describe it."): print(piece, end="")

Thread safety: one Pipeline may be called from many threads at once. What is shared: the three onnxruntime
sessions (their `run` is thread-safe), the tokenizer (read-only), the embedding table and the manifest; every
request has its own KV cache, buffers and random generator, so no lock is held while decoding. `close()` waits
for requests in flight.
"""

from __future__ import annotations

import math
import os
import threading
import time
import weakref
from collections.abc import Iterator
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

import numpy as np

from hired import NEWLINE, HiredConfig, pack_tokens, plan_budget, select_tokens
from runtime.decoder import Decoder
from runtime.errors import BudgetError, BundleError, GenerationError, HiredError, PromptError
from runtime.generate import SamplingConfig, pick_token
from runtime.image import load_image
from runtime.manifest import Manifest
from runtime.preprocess import preprocess
from runtime.prompt import PromptEncoder

DEFAULT_MAX_PIXELS = 64_000_000
DEFAULT_MAX_CONTEXT = 8192
TIMING_KEYS = ("preprocess", "vision", "select", "projector", "prefill", "decode", "total")


@dataclass(frozen=True)
class GenerationResult:
    """The outcome of one request; `.to_dict()` is exactly what `runtime.infer --json` prints."""

    text: str
    token_ids: tuple[int, ...]  # generated ids only, EOS included when produced
    visual_tokens: MappingProxyType  # before (stock span), kept (span fed to the LLM), per_image (base first)
    budget: MappingProxyType  # rate, alpha, total (= T), distribution, newlines
    timings_ms: MappingProxyType  # preprocess, vision, select, projector, prefill, decode, total
    provider: str

    def to_dict(self) -> dict[str, Any]:
        return {
            "text": self.text,
            "token_ids": list(self.token_ids),
            "visual_tokens": {k: (list(v) if isinstance(v, tuple) else v) for k, v in self.visual_tokens.items()},
            "budget": dict(self.budget),
            "timings_ms": dict(self.timings_ms),
            "provider": self.provider,
        }


class TextStream:
    """Iterator of text pieces; when exhausted, `.result` holds the GenerationResult (also StopIteration.value)."""

    def __init__(self, gen: Iterator[str]):
        self._gen = gen
        self.result: GenerationResult | None = None

    def __iter__(self) -> TextStream:
        return self

    def __next__(self) -> str:
        try:
            return next(self._gen)
        except StopIteration as stop:
            self.result = stop.value
            raise StopIteration(stop.value) from None


class _ReleaseOnce:
    """Calls `fn` the first time it is called and never again, from any thread."""

    def __init__(self, fn):
        self._fn = fn
        self._lock = threading.Lock()
        self._done = False

    def __call__(self) -> None:
        with self._lock:
            if self._done:
                return
            self._done = True
        self._fn()


@dataclass
class _Request:
    """Everything checked and prepared before the graphs run (so bad input fails before any heavy work)."""

    pixel_values: np.ndarray
    layout: Any
    cfg: HiredConfig
    sampling: SamplingConfig
    ids_before: list[int]
    ids_after: list[int]
    timings: dict[str, float] = field(default_factory=dict)
    t_start: float = 0.0
    trace: dict | None = None


class Pipeline:
    """Load once, call `generate`/`stream` many times (from any thread)."""

    def __init__(
        self,
        manifest: Manifest,
        *,
        provider: str = "cpu",
        max_pixels: int = DEFAULT_MAX_PIXELS,
        max_context: int = DEFAULT_MAX_CONTEXT,
        threads: int | None = None,
        cache_dir: str | os.PathLike | None = None,
        sessions: dict | None = None,
    ):
        """`sessions` ({"vision", "projector", "decoder"} -> objects with OrtSession's surface) replaces the
        onnxruntime sessions, e.g. with Triton BLS calls; see `from_sessions`."""
        if isinstance(max_pixels, bool) or not isinstance(max_pixels, int) or max_pixels < 1:
            raise HiredError(f"max_pixels must be a positive integer, got {max_pixels!r}")
        self.manifest = manifest
        self.max_pixels = max_pixels
        self.max_context = min(int(max_context), manifest.text.max_position_embeddings)
        if sessions is None:
            # onnxruntime is imported only where this process runs the graphs itself
            from runtime.session import OrtSession, log, provider_chain

            for w in provider_chain(provider, cache_dir)[1]:
                log.warning("%s", w)
            sessions = {
                g: OrtSession.from_manifest(manifest, g, provider, threads=threads, cache_dir=cache_dir, warn=False)
                for g in ("vision", "projector", "decoder")
            }
        self.vision, self.projector, decoder = sessions["vision"], sessions["projector"], sessions["decoder"]
        self.embed_tokens = _load_npy(manifest, "embed_tokens", (manifest.text.vocab_size, manifest.text.hidden_size))
        self.image_newline = _load_npy(manifest, "image_newline", (manifest.text.hidden_size,))
        self.decoder = Decoder(decoder, self.embed_tokens, manifest.text)
        self.prompt = PromptEncoder(manifest.path("tokenizer"), manifest.prompt, manifest.tokens)
        self.defaults = HiredConfig(
            rate=manifest.hired.rate,
            alpha=manifest.hired.alpha,
            distribution=manifest.hired.distribution,
            newlines=manifest.hired.newlines,
        )
        names = {self.vision.provider, self.projector.provider, decoder.provider}
        self.provider = decoder.provider if len(names) == 1 else ",".join(sorted(names))
        self._active = 0
        self._closed = False
        self._cond = threading.Condition()

    @classmethod
    def from_sessions(cls, manifest: Manifest, *, vision, projector, decoder, **options) -> Pipeline:
        """A Pipeline over ready-made graph runners (inputs/outputs/run/dtype/provider, as OrtSession)."""
        return cls(manifest, sessions={"vision": vision, "projector": projector, "decoder": decoder}, **options)

    @classmethod
    def load(cls, artifacts: str | os.PathLike, *, provider: str = "cpu", **options) -> Pipeline:
        """Open a bundle folder (checks version, keys, paths and hashes) and create its sessions."""
        return cls(Manifest.from_file(artifacts), provider=provider, **options)

    # ---- public API ---------------------------------------------------------------------------------
    def generate(
        self,
        image,
        prompt: str,
        *,
        budget: float | None = None,
        alpha: float | None = None,
        distribution: str | None = None,
        newlines: str | None = None,
        max_new_tokens: int = 128,
        temperature: float = 0.0,
        top_p: float = 1.0,
        seed: int | None = None,
        color: str = "rgb",
        trace: dict | None = None,
    ) -> GenerationResult:
        """image: path, bytes, PIL image or uint8 array HxW/HxWx3/HxWx4; None options take the manifest's defaults.

        `trace`, when a dict, is filled with the intermediate arrays (for --dump and --show-kept)."""
        stream = self.stream(
            image, prompt, budget=budget, alpha=alpha, distribution=distribution, newlines=newlines,
            max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, seed=seed, color=color, trace=trace,
        )  # fmt: skip
        for _ in stream:
            pass
        return stream.result

    def stream(self, image, prompt: str, **options) -> TextStream:
        """Same arguments as `generate`; yields text pieces as they are decoded, then `.result`."""
        self._enter()
        try:
            req = self._prepare(image, prompt, **options)
        except BaseException:
            self._leave()
            raise
        release = _ReleaseOnce(self._leave)
        stream = TextStream(self._execute(req, release))
        weakref.finalize(stream, release)  # a stream dropped before its end (even never started) frees its slot
        return stream

    def close(self) -> None:
        """Wait for requests in flight, then release the sessions."""
        with self._cond:
            self._closed = True
            self._cond.wait_for(lambda: self._active == 0)
            self.vision = self.projector = self.decoder = None

    def __enter__(self) -> Pipeline:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ---- steps --------------------------------------------------------------------------------------
    def _enter(self) -> None:
        with self._cond:
            if self._closed:
                raise HiredError("this Pipeline is closed; load a new one")
            self._active += 1

    def _leave(self) -> None:
        with self._cond:
            self._active -= 1
            self._cond.notify_all()

    def hired_config(self, budget=None, alpha=None, distribution=None, newlines=None) -> HiredConfig:
        """HiredConfig from the request's options, the manifest's defaults filling the Nones."""
        d = self.defaults
        rate = d.rate if budget is None else budget
        a = d.alpha if alpha is None else alpha
        for name, v in (("budget", rate), ("alpha", a)):
            if isinstance(v, bool) or not isinstance(v, int | float | np.integer | np.floating) or not math.isfinite(v):
                raise BudgetError(f"{name} must be a finite number, got {v!r}")
        try:
            return HiredConfig(
                rate=float(rate),
                alpha=float(a),
                distribution=d.distribution if distribution is None else distribution,
                newlines=d.newlines if newlines is None else newlines,
            )
        except (ValueError, TypeError) as e:
            raise BudgetError(str(e)) from None

    def _prepare(
        self, image, prompt, *, budget=None, alpha=None, distribution=None, newlines=None, max_new_tokens=128,
        temperature=0.0, top_p=1.0, seed=None, color="rgb", trace=None,
    ) -> _Request:  # fmt: skip
        t0 = time.perf_counter()
        if trace is not None and not isinstance(trace, dict):
            raise HiredError(f"trace must be a dict to fill or None, got {type(trace).__name__}")
        cfg = self.hired_config(budget, alpha, distribution, newlines)
        sampling = SamplingConfig(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, seed=seed)
        if isinstance(prompt, str) and len(prompt) > 16 * self.max_context:
            raise PromptError(f"prompt is {len(prompt)} characters, far over the {self.max_context}-token context")
        ids_before, ids_after = self.prompt.encode(prompt)
        rgb = load_image(image, color=color, max_pixels=self.max_pixels)
        pre = preprocess(rgb, self.manifest.image_processor, patch_size=self.manifest.vision.patch_size)
        text_len = len(ids_before) + len(ids_after)
        if text_len + sampling.max_new_tokens + pre.layout.tokens_per_image > self.max_context:
            raise PromptError(
                f"prompt is {text_len} tokens; with the image and max_new_tokens={sampling.max_new_tokens} it "
                f"exceeds the {self.max_context}-token context; shorten it"
            )
        req = _Request(pre.pixel_values, pre.layout, cfg, sampling, ids_before, ids_after, t_start=t0, trace=trace)
        req.timings["preprocess"] = time.perf_counter() - t0
        return req

    def _execute(self, req: _Request, release: _ReleaseOnce) -> Iterator[str]:
        try:
            return (yield from self._run(req))
        finally:
            release()

    def _run(self, req: _Request) -> Iterator[str]:
        m, layout, cfg, tm = self.manifest, req.layout, req.cfg, req.timings
        vin, vout = self.vision.inputs, self.vision.outputs
        t = time.perf_counter()
        feats, early, late = self.vision.run(
            {vin["pixel_values"]: req.pixel_values}, [vout["features"], vout["early_scores"], vout["late_scores"]]
        )
        tm["vision"] = time.perf_counter() - t

        t = time.perf_counter()
        try:
            plan = plan_budget(layout, early[0].astype(np.float32), cfg)
            keep = select_tokens(late.astype(np.float32), plan, layout)
        except ValueError as e:  # non-finite scores from a broken graph
            raise GenerationError(f"vision graph gave unusable attention scores ({e}); check the bundle") from None
        order = pack_tokens(keep, layout, cfg)
        tm["select"] = time.perf_counter() - t

        t = time.perf_counter()
        is_token = order != NEWLINE
        flat = feats.reshape(-1, feats.shape[-1])
        (projected,) = self.projector.run(
            {self.projector.inputs["features"]: flat[order[is_token]]}, [self.projector.outputs["projected"]]
        )
        visual = np.empty((order.shape[0], projected.shape[-1]), dtype=projected.dtype)
        visual[is_token] = projected
        visual[~is_token] = self.image_newline.astype(projected.dtype)
        tm["projector"] = time.perf_counter() - t

        embeds = np.concatenate(
            [self.embed_tokens[req.ids_before], visual.astype(self.embed_tokens.dtype), self.embed_tokens[req.ids_after]]
        )
        if embeds.shape[0] + req.sampling.max_new_tokens > self.max_context:
            raise PromptError(
                f"prompt + image make {embeds.shape[0]} tokens; with max_new_tokens={req.sampling.max_new_tokens} "
                f"that exceeds the {self.max_context}-token context; shorten the prompt or lower the budget"
            )
        t = time.perf_counter()
        logits, past = self.decoder.prefill(embeds)
        tm["prefill"] = time.perf_counter() - t
        if req.trace is not None:
            req.trace.update(
                pixel_values=req.pixel_values, early_scores=early, late_scores=late, kept_indices=keep, layout=layout,
                plan=plan, order=order, inputs_embeds=embeds, prefill_logits=logits,
            )  # fmt: skip

        t = time.perf_counter()
        rng = np.random.default_rng(req.sampling.seed)
        eos = m.tokens.eos
        ids: list[int] = []
        shown = ""
        position = embeds.shape[0]
        while True:
            token = pick_token(logits, req.sampling, rng)
            ids.append(token)
            if token != eos:
                text = self.prompt.decode(ids)
                if not text.endswith("\ufffd") and len(text) > len(shown) and text.startswith(shown):
                    yield text[len(shown) :]
                    shown = text
            if token == eos or len(ids) >= req.sampling.max_new_tokens:
                break
            logits, past = self.decoder.step(token, position, past)
            position += 1
        text = self.prompt.decode([i for i in ids if i != eos])
        if text.startswith(shown) and len(text) > len(shown):
            yield text[len(shown) :]
        tm["decode"] = time.perf_counter() - t
        tm["total"] = time.perf_counter() - req.t_start

        return GenerationResult(
            text=text,
            token_ids=tuple(ids),
            visual_tokens=MappingProxyType(
                {"before": int(layout.stock_tokens), "kept": int(order.shape[0]), "per_image": tuple(len(k) for k in keep)}
            ),
            budget=MappingProxyType(
                {"rate": cfg.rate, "alpha": cfg.alpha, "total": int(plan.total), "distribution": cfg.distribution,
                 "newlines": cfg.newlines}
            ),  # fmt: skip
            timings_ms=MappingProxyType({k: round(tm.get(k, 0.0) * 1000, 3) for k in TIMING_KEYS}),
            provider=self.provider,
        )


def _load_npy(manifest: Manifest, name: str, shape: tuple[int, ...]) -> np.ndarray:
    path = manifest.path(name)
    try:
        arr = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as e:
        raise BundleError(f"{manifest.files[name]} is not a numpy array file ({e}); re-export the bundle") from None
    if arr.shape != shape:
        raise BundleError(f"{manifest.files[name]} has shape {arr.shape}, the manifest implies {shape}; re-export")
    return arr
