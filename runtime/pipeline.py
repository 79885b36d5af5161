"""The Python API: image(s) + prompt -> HiRED-pruned LLaVA-NeXT / LLaVA-1.5 answer, on onnxruntime only.

    from runtime import Pipeline
    with Pipeline.load("artifacts/tiny") as p:
        r = p.generate(frame, "What is on the table?", budget=0.2)      # -> GenerationResult
        for piece in p.stream(frame, "Describe it."): print(piece, end="")

One request runs named stages: preprocess (checks, image, prompt) -> vision -> select (HiRED) -> project (kept
tokens only) -> splice (prompt embeddings around the visual span) -> generate (runtime.generate's loop).
The request options are runtime.options.RequestOptions; `image=None` asks without an image, a list of images
asks about several (runtime.visual: each its own layout and HiRED plan at the request's rate).

Thread safety: one Pipeline may be called from many threads at once. What is shared: the three onnxruntime
sessions (their `run` is thread-safe), the tokenizer (read-only), the embedding table and the manifest; every
request has its own KV cache, buffers and random generator, so no lock is held while decoding.
`close(timeout=30.0)` ends the closing thread's own open streams at once, gives requests of other threads up
to `timeout` seconds, then cancels them (see `close`).
"""

from __future__ import annotations

import inspect
import os
import threading
import time
import weakref
from collections.abc import Iterator
from dataclasses import dataclass, field, fields
from pathlib import Path
from types import MappingProxyType
from typing import Any

import numpy as np

from hired import NEWLINE, AnyresLayout, BudgetPlan, HiredConfig
from hired.selectors import Selection
from runtime.bundle_check import check_loaded
from runtime.decoder import Decoder
from runtime.errors import (
    BundleError,
    GenerationError,
    HiredError,
    ImageError,
    PipelineClosedError,
    PromptError,
)
from runtime.generate import Generation, stream_text
from runtime.governor import Governor, auto_budget, calibrate
from runtime.image import DEFAULT_MAX_PIXELS, load_image
from runtime.leftovers import remove_old_bundles
from runtime.manifest import Manifest
from runtime.options import RequestOptions, SamplingConfig
from runtime.preprocess import preprocess
from runtime.prompt import Chat, PromptEncoder
from runtime.quant import check_method, check_onnxruntime
from runtime.selection import projector_rows, select_stage
from runtime.similarity import NearestTarget
from runtime.stream import CLOSED, TextStream, _ReleaseOnce
from runtime.visual import ImagePart, budget_total, fill_trace, image_list, span_bound, splice, visual_tokens

DEFAULT_MAX_CONTEXT = 8192
DEFAULT_CLOSE_TIMEOUT_S = 30.0
# The keys of GenerationResult.timings_ms (export/reference.py has its own TIMING_KEYS, with "ttft").
RESULT_TIMING_KEYS = ("preprocess", "vision", "select", "projector", "prefill", "decode", "total")


@dataclass(frozen=True)
class GenerationResult:
    """The outcome of one request; `.to_dict()` is exactly what `runtime.infer --json` prints."""

    text: str
    token_ids: tuple[int, ...]  # generated ids only, EOS included when produced
    visual_tokens: MappingProxyType  # before (stock span), kept (span fed to the LLM), per_image (base first);
    # with several images also `images`: ({before, kept} per input image); per_image is flat over all of them
    budget: MappingProxyType  # rate, alpha, total (= T), distribution, newlines
    timings_ms: MappingProxyType  # RESULT_TIMING_KEYS
    provider: str
    quant: str = "none"  # the decoder's weights: "none", "int8" or "int4" (manifest quant.method)
    selector: str = "hired"  # which tokens the budget kept (hired.selectors)

    def to_dict(self) -> dict[str, Any]:
        return {
            "text": self.text,
            "token_ids": list(self.token_ids),
            "visual_tokens": {k: (list(v) if isinstance(v, tuple) else v) for k, v in self.visual_tokens.items()},
            "budget": dict(self.budget),
            "timings_ms": dict(self.timings_ms),
            "provider": self.provider,
            "quant": self.quant,
            "selector": self.selector,
        }


@dataclass
class Trace:
    """The intermediate arrays of one request, filled by `generate(..., trace=Trace())`: for `runtime.infer
    --dump`, the kept-token picture (runtime.visualize) and the benchmarks. None where a stage did not run
    (a text-only request has no image stages). With several images the per-image fields stay None and `images`
    holds one Trace per image; inputs_embeds and prefill_logits are the request's."""

    pixel_values: np.ndarray | None = None  # [n, 3, s, s] as fed to the vision graph (base image first)
    early_scores: np.ndarray | None = None  # [n, 576] early-layer CLS attention
    late_scores: np.ndarray | None = None  # [n, 576] late-layer CLS attention
    features: np.ndarray | None = None  # [n, 576, Dv] feature-layer features (the projector's input)
    groups: Any = None  # merged slots of the selector: flat id -> flat ids averaged into it (visionzip)
    kept_indices: list[np.ndarray] | None = None  # per image, kept token indices in raster order
    layout: AnyresLayout | None = None
    plan: BudgetPlan | None = None
    order: np.ndarray | None = None  # [span] packed visual span: image * 576 + token, or NEWLINE
    inputs_embeds: np.ndarray | None = None  # [L, Dt] what the decoder's prefill got
    prefill_logits: np.ndarray | None = None  # [V] last-position logits of the prefill
    images: list[Trace] = field(default_factory=list)  # one per input image (the fields above them, per image)


@dataclass
class _Request:
    """Everything checked and prepared before the graphs run (so bad input fails before any heavy work)."""

    cfg: HiredConfig
    sampling: SamplingConfig
    segments: list[list[int]]  # prompt ids around the images' slots (one list for a text-only request)
    graphs: tuple  # (vision, projector, decoder) of this request: close() may drop the Pipeline's own
    parts: list[ImagePart] = field(default_factory=list)  # one per input image, in prompt order
    timings: dict[str, float] = field(default_factory=dict)
    t_start: float = 0.0
    trace: Trace | None = None
    selector: str = "hired"
    auto: dict | None = None  # budget="auto": requested, target_ttft_ms, predicted_ttft_ms (+ note)


def _options_signature() -> inspect.Signature:
    """generate()'s signature as help() and IDEs show it, derived from RequestOptions (one list of defaults)."""
    params = [
        inspect.Parameter("self", inspect.Parameter.POSITIONAL_OR_KEYWORD),
        inspect.Parameter("image", inspect.Parameter.POSITIONAL_OR_KEYWORD),
        inspect.Parameter("prompt", inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation="str | Chat"),
    ]
    params += [
        inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=f.default, annotation=f.type)
        for f in fields(RequestOptions)
    ]
    params.append(inspect.Parameter("trace", inspect.Parameter.KEYWORD_ONLY, default=None, annotation="Trace | None"))
    return inspect.Signature(params, return_annotation="GenerationResult")


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
        min_budget: float = 0.05,
    ):
        """`sessions` ({"vision", "projector", "decoder"} -> objects with OrtSession's surface) replaces the
        onnxruntime sessions, e.g. with Triton BLS calls; see `from_sessions`. `min_budget`: the lowest rate
        budget="auto" may pick."""
        if isinstance(max_pixels, bool) or not isinstance(max_pixels, int) or max_pixels < 1:
            raise HiredError(f"max_pixels must be a positive integer, got {max_pixels!r}")
        if isinstance(max_context, bool) or not isinstance(max_context, int) or max_context < 1:
            raise HiredError(f"max_context must be a positive integer, got {max_context!r}")
        self.manifest = manifest
        self.max_pixels = max_pixels
        self.max_context = min(int(max_context), int(manifest.text.max_position_embeddings))
        check_method(manifest.quant.method, manifest.quant.block_size)
        if sessions is None:
            # onnxruntime is imported only where this process runs the graphs itself
            from runtime.session import OrtSession, log, provider_chain

            check_onnxruntime(manifest.quant.method, opset_min=str(manifest.export_info.get("min_onnxruntime", "")))

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
        check_loaded(manifest, embed_tokens=self.embed_tokens, image_newline=self.image_newline, tokenizer=self.prompt.tokenizer)
        self.defaults = HiredConfig(
            rate=manifest.hired.rate,
            alpha=manifest.hired.alpha,
            distribution=manifest.hired.distribution,
            newlines=manifest.hired.newlines,
        )
        self.nearest = NearestTarget(threads)  # visionzip's similarity search, on this Pipeline's thread count
        names = {self.vision.provider, self.projector.provider, decoder.provider}
        self.provider = decoder.provider if len(names) == 1 else ",".join(sorted(names))
        try:
            self.governor = Governor(manifest, self.provider, min_budget=min_budget)  # budget="auto"'s cost model
        except ValueError as e:
            raise HiredError(str(e)) from None
        self._active = 0
        self._closed = False
        self._cancel = threading.Event()  # set when close() gave up waiting: requests stop at their next check
        self._cond = threading.Condition()
        self._streams: weakref.WeakSet[TextStream] = weakref.WeakSet()

    @classmethod
    def from_sessions(cls, manifest: Manifest, *, vision, projector, decoder, **options) -> Pipeline:
        """A Pipeline over ready-made graph runners (inputs/outputs/run/dtype/provider, as OrtSession)."""
        return cls(manifest, sessions={"vision": vision, "projector": projector, "decoder": decoder}, **options)

    @classmethod
    def load(cls, artifacts: str | os.PathLike, *, provider: str = "cpu", **options) -> Pipeline:
        """Open a bundle folder (checks version, keys, paths and hashes) and create its sessions.

        A bundle that loads is complete, so the `.<name>.old-*` folders a killed export left beside it go."""
        pipe = cls(Manifest.from_file(artifacts), provider=provider, **options)
        remove_old_bundles(Path(artifacts))
        return pipe

    # ---- public API ---------------------------------------------------------------------------------
    def generate(self, image, prompt: str | Chat, *, trace: Trace | None = None, **options) -> GenerationResult:
        """image: path, bytes, PIL image, uint8 array HxW/HxWx3/HxWx4, a list of them (several images: none or one
        `<image>` marker per image in the prompt), or None (text only: the prompt template without its image slot, no
        visual tokens). prompt: the user's text, or a runtime.prompt.Chat of turns.

        options: runtime.options.RequestOptions' fields (budget, alpha, distribution, newlines, max_new_tokens,
        min_new_tokens, temperature, top_p, seed, color); None HiRED options take the manifest's defaults.
        `trace`, a Trace, is filled with the intermediate arrays (for --dump and --show-kept)."""
        stream = self.stream(image, prompt, trace=trace, **options)
        for _ in stream:
            pass
        return stream.result

    generate.__signature__ = _options_signature()

    def stream(self, image, prompt: str | Chat, *, trace: Trace | None = None, **options) -> TextStream:
        """Same arguments as `generate`; yields text pieces as they are decoded, then `.result`."""
        self._enter()
        try:
            req = self._prepare(image, prompt, RequestOptions.from_kwargs(**options), trace)
        except BaseException:
            self._leave()
            raise
        release = _ReleaseOnce(self._leave)
        stream = TextStream(self._execute(req, release), release)
        weakref.finalize(stream, release)  # a stream dropped before its end (even never started) frees its slot
        with self._cond:
            self._streams.add(stream)
        return stream

    @property
    def active_requests(self) -> int:
        """Requests accepted and not yet finished (streams not read to their end included)."""
        with self._cond:
            return self._active

    def hired_config(self, **options) -> HiredConfig:
        """HiredConfig of request options (budget, alpha, distribution, newlines), the manifest filling Nones."""
        return RequestOptions.from_kwargs(**options).hired_config(self.defaults)

    def calibrate(self, image=None, prompt: str | Chat = "Describe the image.") -> None:
        """Measure budget="auto"'s cost model now: 3 short runs (default image: a grey 672x672 frame, 5 partitions)."""
        calibrate(self, np.full((672, 672, 3), 128, np.uint8) if image is None else image, prompt)

    def close(self, timeout: float = DEFAULT_CLOSE_TIMEOUT_S) -> None:
        """Refuse new requests (PipelineClosedError), finish or end the ones open, release the sessions.

        Streams this thread made or last advanced end at once (this thread cannot advance them while it is
        in close()). Requests of other threads get up to `timeout` seconds to finish; then each is cancelled:
        a waiting stream ends, a running one stops at its next check (between stages and between decode
        steps) - both raise PipelineClosedError. So close() returns within about `timeout` seconds; a graph
        call running in another thread finishes there after close() returned. Calling it again is harmless."""
        if isinstance(timeout, bool) or not isinstance(timeout, int | float) or not timeout >= 0:
            raise HiredError(f"timeout must be a number of seconds >= 0, got {timeout!r}")
        with self._cond:
            self._closed = True
            streams = list(self._streams)
        me = threading.get_ident()
        for s in streams:
            if s._owner == me:
                s._end()
        with self._cond:
            if not self._cond.wait_for(lambda: self._active == 0, timeout=timeout):
                self._cancel.set()
            streams = list(self._streams)
        if self._cancel.is_set():
            for s in streams:
                s._end()
        self.vision = self.projector = self.decoder = None

    def __enter__(self) -> Pipeline:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ---- bookkeeping -----------------------------------------------------------------------------------
    def _enter(self) -> None:
        with self._cond:
            if self._closed:
                raise PipelineClosedError(CLOSED)
            self._active += 1

    def _leave(self) -> None:
        with self._cond:
            self._active -= 1
            self._cond.notify_all()

    def _cancelled(self) -> bool:
        return self._cancel.is_set()

    def _check_open(self) -> None:
        if self._cancel.is_set():
            raise PipelineClosedError(f"{CLOSED} (close() cancelled this request)")

    def _execute(self, req: _Request, release: _ReleaseOnce) -> Iterator[str]:
        try:
            return (yield from self._run(req))
        finally:
            release()

    # ---- stages --------------------------------------------------------------------------------------
    def _prepare(self, image, prompt, opts: RequestOptions, trace: Trace | None) -> _Request:
        """Check the options, prompt and image and preprocess the image: every cheap check before any graph."""
        t0 = time.perf_counter()
        if trace is not None and not isinstance(trace, Trace):
            raise HiredError(f"trace must be a runtime.pipeline.Trace to fill or None, got {type(trace).__name__}")
        cfg, sampling = opts.hired_config(self.defaults), opts.sampling
        if sampling.max_new_tokens >= self.max_context:
            raise GenerationError(
                f"max_new_tokens={sampling.max_new_tokens} does not fit the {self.max_context}-token context; "
                f"ask for fewer than {self.max_context} tokens"
            )
        chars = prompt.chars if isinstance(prompt, Chat) else len(prompt) if isinstance(prompt, str) else 0
        if chars > 16 * self.max_context:
            raise PromptError(f"prompt is {chars} characters, far over the {self.max_context}-token context")
        graphs = (self.vision, self.projector, self.decoder)
        images = image_list(image)  # none: text only, the template without its image slot
        segments = self.prompt.encode_slots(prompt, len(images))
        req = _Request(cfg, sampling, segments, graphs, [self._preprocess(im, i, len(images), opts.color)
                       for i, im in enumerate(images)], t_start=t0, trace=trace)  # fmt: skip
        text_len = sum(len(ids) for ids in segments)
        lowest = opts.hired_config(self.defaults, rate=self.governor.min_budget) if opts.is_auto else cfg
        self._check_context(text_len, req.parts, lowest, sampling.max_new_tokens)
        req.timings["preprocess"] = time.perf_counter() - t0
        req.selector = opts.selector
        if opts.is_auto:  # the governor's rate (one for every image), calibrating first on this request if it must
            layouts = [part.layout for part in req.parts]
            req.cfg, req.auto = auto_budget(self, opts, layouts, image, prompt, text_len, req.timings["preprocess"])
            self._check_context(text_len, req.parts, req.cfg, sampling.max_new_tokens)  # at the chosen rate
        return req

    def _check_context(self, text_len: int, parts: list[ImagePart], cfg: HiredConfig, max_new: int) -> None:
        """Before any graph of the request runs, with each image's largest span under `cfg` (runtime.visual.
        span_bound): PromptError when the prompt alone leaves no room for a new token, GenerationError when
        max_new_tokens takes it past the context the KV cache can hold."""
        visual = sum(span_bound(part.layout, cfg) for part in parts)
        prompt, images = text_len + visual, f" + up to {visual} visual tokens" if parts else ""
        if prompt >= self.max_context:
            raise PromptError(
                f"prompt is {text_len} tokens{images}, which fills the {self.max_context}-token context; shorten it"
                + (" or lower the budget" if parts else "")
            )
        if prompt + max_new > self.max_context:
            raise GenerationError(
                f"prompt ({text_len} tokens{images}) + max_new_tokens={max_new} exceeds the {self.max_context}-token "
                f"context the KV cache can hold; ask for at most {self.max_context - prompt} new tokens"
            )

    def _preprocess(self, image, index: int, count: int, color: str) -> ImagePart:
        """One input image -> its pixel values and layout; an ImageError names the image when there are several."""
        try:
            rgb = load_image(image, color=color, max_pixels=self.max_pixels)
        except ImageError as e:
            raise (ImageError(f"image {index}: {e}") if count > 1 else e) from None
        return ImagePart(preprocess(rgb, self.manifest.image_processor, patch_size=self.manifest.vision.patch_size))

    def _vision(self, req: _Request, part: ImagePart) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """pixel_values [n, 3, s, s] -> (features [n, 576, Dv], early scores [n, 576], late scores [n, 576])."""
        vision = req.graphs[0]
        name = vision.inputs["pixel_values"]
        out = vision.outputs
        feats, early, late = vision.run(
            {name: part.pre.pixel_values.astype(vision.dtype(name), copy=False)},
            [out["features"], out["early_scores"], out["late_scores"]],
        )
        return feats, early, late

    def _select(self, req: _Request, part: ImagePart) -> tuple[Selection, np.ndarray]:
        """The request's selector (HiRED by default; runtime.selection) on one image -> (Selection, packed order)."""
        return select_stage(
            part.layout, req.cfg, req.selector, req.sampling.seed, part.feats, part.early, part.late, self.nearest
        )

    def _project(self, req: _Request, rows: np.ndarray, order: np.ndarray) -> np.ndarray:
        """The kept tokens' rows [k, Dv] through the projector, newline embeddings in their slots: [span, Dt]."""
        projector = req.graphs[1]
        name = projector.inputs["features"]
        is_token = order != NEWLINE
        (projected,) = projector.run(
            {name: rows.astype(projector.dtype(name), copy=False)}, [projector.outputs["projected"]]
        )
        visual = np.empty((order.shape[0], projected.shape[-1]), dtype=projected.dtype)
        visual[is_token] = projected
        visual[~is_token] = self.image_newline.astype(projected.dtype)
        return visual

    def _splice(self, req: _Request) -> np.ndarray:
        """Prompt embeddings around the images' visual spans: inputs_embeds [L, Dt]. The exact span is within
        _check_context's bound; past the context anyway (a bug) it is a GenerationError before the decoder runs."""
        embeds = splice(self.embed_tokens, req.segments, [part.visual for part in req.parts])
        if embeds.shape[0] + req.sampling.max_new_tokens > self.max_context:
            raise GenerationError(
                f"prompt + image make {embeds.shape[0]} tokens; with max_new_tokens={req.sampling.max_new_tokens} "
                f"that exceeds the {self.max_context}-token context; shorten the prompt or lower the budget"
            )
        return embeds

    def _generate(self, req: _Request, embeds: np.ndarray) -> Iterator[str]:
        """runtime.generate's loop as text pieces; returns (text, token ids)."""
        eos = self.manifest.tokens.eos
        gen = Generation(
            req.graphs[2], embeds, req.sampling, eos=eos, cancelled=self._cancelled,
            cancel_error=lambda: PipelineClosedError(f"{CLOSED} (close() cancelled this request)"),
        )  # fmt: skip
        t = time.perf_counter()
        text = yield from stream_text(_after_prefill(gen, req), self.prompt.decode, eos)
        req.timings["prefill"] = gen.prefill_s
        req.timings["decode"] = time.perf_counter() - t - gen.prefill_s
        return text, tuple(gen.ids)

    def _run(self, req: _Request) -> Iterator[str]:
        tm, trace = req.timings, req.trace
        for part in req.parts:  # each image: vision -> select (its own plan at the request's rate) -> project
            self._check_open()
            t = time.perf_counter()
            part.feats, part.early, part.late = self._vision(req, part)
            tm["vision"] = tm.get("vision", 0.0) + time.perf_counter() - t
            self._check_open()
            t = time.perf_counter()
            part.selection, part.order = self._select(req, part)
            tm["select"] = tm.get("select", 0.0) + time.perf_counter() - t
            t = time.perf_counter()
            rows = projector_rows(part.feats, part.order, part.selection.groups)
            part.visual = self._project(req, rows, part.order)
            tm["projector"] = tm.get("projector", 0.0) + time.perf_counter() - t
        if trace is not None:
            fill_trace(trace, req.parts)
        embeds = self._splice(req)
        if trace is not None:
            trace.inputs_embeds = embeds
        self._check_open()
        text, ids = yield from self._generate(req, embeds)
        tm["total"] = time.perf_counter() - req.t_start
        cfg = req.cfg
        visual = visual_tokens(req.parts)
        partitions = sum(part.layout.n_images for part in req.parts)
        self.governor.observe(n_images=partitions, span=visual["kept"], prompt_tokens=embeds.shape[0], timings_s=tm)
        return GenerationResult(
            text=text,
            token_ids=ids,
            visual_tokens=MappingProxyType(visual),
            budget=MappingProxyType(
                {"rate": cfg.rate, "alpha": cfg.alpha, "total": budget_total(req.parts),
                 "distribution": cfg.distribution, "newlines": cfg.newlines, **(req.auto or {})}
            ),  # fmt: skip
            timings_ms=MappingProxyType({k: round(tm.get(k, 0.0) * 1000, 3) for k in RESULT_TIMING_KEYS}),
            provider=self.provider,
            quant=self.manifest.quant.method,
            selector=req.selector,
        )


def _after_prefill(gen: Generation, req: _Request) -> Iterator[int]:
    """The tokens of `gen`, recording the prefill logits into the request's trace once the prefill ran."""
    first = True
    for token in gen:
        if first and req.trace is not None:
            req.trace.prefill_logits = gen.prefill_logits
        first = False
        yield token


def _load_npy(manifest: Manifest, name: str, shape: tuple[int, ...]) -> np.ndarray:
    path = manifest.path(name)
    try:
        arr = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as e:
        raise BundleError(f"{manifest.files[name]} is not a numpy array file ({e}); re-export the bundle") from None
    if arr.shape != shape:
        raise BundleError(f"{manifest.files[name]} has shape {arr.shape}, the manifest implies {shape}; re-export")
    return arr
