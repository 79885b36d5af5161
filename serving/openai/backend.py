"""What answers a chat request: an in-process Pipeline (`local`) or a Triton fleet (`grpc://`, `http://`), and
one request's run on it (`Job`: blocking calls, made from the server's worker threads).

    backend = LocalBackend.load("artifacts/tiny")          # or RemoteBackend("grpc://10.0.0.5:8001", "artifacts/tiny")
    job = Job(backend, call, image_bytes)                  # call: serving.openai.schema.Call
    job.open()                                             # checks and prepares (bad input: a HiredError now)
    while (piece := job.next_piece()) is not None: ...     # text pieces, stop strings applied
    job.finish_reason, job.usage(), job.facts()

The remote backend has no token stream (RemotePipeline.generate answers whole): a streamed request through it
gets its text as one chunk.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from typing import Any

from runtime.errors import HiredError, PromptError
from runtime.manifest import Manifest
from runtime.options import RequestOptions
from runtime.pipeline import GenerationResult, Trace
from runtime.prompt import Chat, PromptEncoder

# Options passed to Pipeline.stream / RemotePipeline.generate (the keyword set both take)
_PASSED = ("budget", "alpha", "distribution", "newlines", "selector", "target_ttft_ms", "max_new_tokens", "temperature",
           "top_p", "seed")  # fmt: skip


def _keywords(options: RequestOptions) -> dict[str, Any]:
    return {k: getattr(options, k) for k in _PASSED}


class LocalBackend:
    """A Pipeline in this process; its stream is closed when a client goes away (the slot frees at once)."""

    name = "local"
    streams = True

    def __init__(self, pipeline):
        self.pipeline = pipeline
        self.manifest: Manifest = pipeline.manifest
        self.prompt: PromptEncoder = pipeline.prompt

    @classmethod
    def load(cls, artifacts: str, *, provider: str = "cpu", threads: int | None = None) -> LocalBackend:
        from runtime.pipeline import Pipeline

        return cls(Pipeline.load(artifacts, provider=provider, threads=threads))

    def open(self, image: bytes | list[bytes] | None, prompt: str | Chat, options: RequestOptions, trace=None):
        # one image (or a list of several) + one user message: exactly Pipeline.generate(image, text), streamed
        return self.pipeline.stream(image, prompt, trace=trace, **_keywords(options))

    def check_ready(self) -> None:
        """Loaded: always ready."""

    def close(self) -> None:
        self.pipeline.close()


class RemoteBackend:
    """A stateless gateway: each request is one RemotePipeline.generate on the Triton fleet (answered whole)."""

    name = "remote"
    streams = False

    def __init__(self, address: str, artifacts: str, *, timeout_s: float = 300.0):
        from serving.remote import RemotePipeline

        self.manifest = Manifest.from_file(artifacts)  # the model's name and tokenizer (prompt token counts)
        self.prompt = PromptEncoder(
            self.manifest.path("tokenizer"), self.manifest.prompt, self.manifest.tokens
        )
        self.remote = RemotePipeline(address, timeout_s=timeout_s, check=False)  # the fleet may start later
        self.address = self.remote.address

    def check_ready(self) -> None:
        """RemoteError unless the fleet answers and its model is ready (GET /health asks this)."""
        self.remote.check_ready()

    def open(self, image: bytes | None, prompt: str | Chat, options: RequestOptions, trace=None):
        if image is None or isinstance(image, list) or isinstance(prompt, Chat):
            raise PromptError(
                f"the gateway to {self.address} takes one image and one user message (no system message, earlier "
                "turns or text-only requests); run the server with --backend local for those"
            )
        result = self.remote.generate(image, prompt, **_keywords(options))

        def one_chunk():
            if result.text:
                yield result.text
            return result

        return one_chunk()

    def close(self) -> None:
        self.remote.close()


class Job:
    """One request on a backend. Not thread-safe: one worker thread at a time calls open/next_piece/close."""

    def __init__(self, backend, image: bytes | list[bytes] | None, prompt: str | Chat, options: RequestOptions,
                 stop: tuple[str, ...] = ()):  # fmt: skip
        self.backend, self.image, self.prompt, self.options, self.stop = backend, image, prompt, options, stop
        self.stream: Iterator[str] | None = None  # a Pipeline TextStream (or any iterator returning the result)
        self.result: GenerationResult | None = None
        self.text = ""  # what the client has been sent (or will get), stop strings cut off
        self.finish_reason: str | None = None
        self.t_open = 0.0
        self.t_first: float | None = None  # perf_counter of the first text piece
        self.cancel = threading.Event()  # set by the server (shutdown): stop at the next token
        self.trace: Trace | None = None
        self.finished = False  # the server has closed it and freed its slot
        self._lock = threading.RLock()  # next_piece and close never overlap (close waits for the step)
        self._raw = ""
        self._generated = 0  # pieces seen (a lower bound of the tokens, when a stop string ends early)
        self._hold = max((len(s) for s in stop), default=1) - 1

    def open(self) -> None:
        self.t_open = time.perf_counter()
        # with stop strings the stream may be closed before its result: the trace then gives the visual span
        self.trace = Trace() if self.stop and self.backend.streams else None
        self.stream = self.backend.open(self.image, self.prompt, self.options, trace=self.trace)

    def next_piece(self) -> str | None:
        """The next text piece for the client ('' = nothing to send yet), or None when the answer is complete."""
        with self._lock:
            return self._next_piece()

    def _next_piece(self) -> str | None:
        if self.finish_reason is not None:
            return None
        if self.cancel.is_set() or self.stream is None:
            self.close()
            self.finish_reason = "cancelled"
            return None
        try:
            piece = next(self.stream)
        except StopIteration as stop:
            self.result = stop.value
            rest = self._raw[len(self.text) :]
            self.text = self._raw
            eos = self.backend.manifest.tokens.eos
            self.finish_reason = (
                "stop" if self.result.token_ids and self.result.token_ids[-1] == eos else "length"
            )
            return rest or None
        if self.t_first is None:
            self.t_first = time.perf_counter()
        self._generated += 1
        self._raw += piece
        if not self.stop:
            self.text = self._raw
            return piece
        cut = min((i for i in (self._raw.find(s) for s in self.stop) if i >= 0), default=-1)
        if cut >= 0:
            out = self._raw[len(self.text) : cut]
            self.text = self._raw[:cut]
            self.finish_reason = "stop"
            if self.backend.streams:
                self.close()  # no more tokens needed
            else:  # the answer is complete already: keep its result (token counts, facts)
                while True:
                    try:
                        next(self.stream)
                    except StopIteration as end:
                        self.result = end.value
                        break
            return out
        keep = len(self._raw)
        for k in range(
            min(self._hold, len(self._raw)), 0, -1
        ):  # hold back a tail that may start a stop string
            if any(s.startswith(self._raw[-k:]) for s in self.stop):
                keep -= k
                break
        out = self._raw[len(self.text) : keep]
        self.text = self._raw[:keep]
        return out

    def run(self) -> None:
        """open, then every piece (the non-streaming path, in one worker call)."""
        self.open()
        while self.next_piece() is not None:
            pass

    def close(self) -> None:
        """End the stream now (its Pipeline slot is freed); safe to call twice."""
        with self._lock:
            stream, self.stream = self.stream, None
            if stream is not None:
                stream.close()  # TextStream.close frees the Pipeline slot, started or not; a generator runs `finally`

    # ---- the reply's numbers ---------------------------------------------------------------------------
    def completion_tokens(self) -> int:
        if self.result is not None:
            return len(self.result.token_ids)
        return self._generated  # ended by a stop string: the text pieces decoded so far (>= 1 token each)

    def visual_tokens(self) -> dict[str, int]:
        """{before, kept} of the visual span ({0, 0} for a text-only request)."""
        if self.result is not None:
            return {k: int(self.result.visual_tokens[k]) for k in ("before", "kept")}
        trace = getattr(self, "trace", None)
        if trace is not None and trace.images:  # one Trace per image once the images' spans are made
            return {"before": sum(int(t.layout.stock_tokens) for t in trace.images),
                    "kept": sum(int(t.order.shape[0]) for t in trace.images)}  # fmt: skip
        return {"before": 0, "kept": 0}

    def prompt_tokens(self) -> int:
        """Text tokens of the prompt + the visual tokens fed to the LLM."""
        try:
            images = 0 if self.image is None else len(self.image) if isinstance(self.image, list) else 1
            segments = self.backend.prompt.encode_slots(self.prompt, images)
        except HiredError:
            return 0
        return sum(len(ids) for ids in segments) + self.visual_tokens()["kept"]

    def usage(self) -> dict[str, int]:
        p, c = self.prompt_tokens(), self.completion_tokens()
        return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}

    def facts(self) -> dict[str, Any] | None:
        """The HiRED facts of the reply: visual tokens, budget, timings, provider (only the visual tokens when a
        stop string ended the stream early)."""
        if self.result is None:
            return {"visual_tokens": self.visual_tokens()}
        d = self.result.to_dict()
        d.pop("text", None)
        d.pop("token_ids", None)
        return d
