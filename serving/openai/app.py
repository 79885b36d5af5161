"""The OpenAI-compatible HTTP app (FastAPI): `/v1/chat/completions`, `/v1/models`, `/health`, `/metrics`.

    app = create_app(lambda: LocalBackend.load("artifacts/tiny"), Settings(model_name="tiny"))
    uvicorn.run(app, host="127.0.0.1", port=8080)          # python -m serving.openai does this

The backend is loaded in a worker thread once the server listens: `/health` answers 503 until it is ready.
Each request waits for one of `max_concurrency` slots (at most `max_queue` wait; more: 429); its runtime work
runs on a pool of as many threads. Every error is answered in OpenAI's shape {"error": {message, type, param,
code}}; bad input is a 4xx, never a 500.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from runtime.errors import GenerationError, HiredError, PipelineClosedError, RemoteError
from serving.openai.backend import Job
from serving.openai.images import ImagePolicy
from serving.openai.metrics import Metrics
from serving.openai.schema import APIError, Call, bad_request, parse_request, to_call
from serving.openai.slots import Full, Slots

log = logging.getLogger("serving.openai")
DEFAULT_MAX_BODY = 32 * 1024 * 1024


@dataclass
class Settings:
    model_name: str | None = None  # None: the bundle's model name
    api_key: str | None = None
    max_concurrency: int = 4
    max_queue: int = 64
    max_body: int = DEFAULT_MAX_BODY
    images: ImagePolicy = field(default_factory=ImagePolicy)
    shutdown_grace_s: float = 10.0  # on SIGTERM, requests still running after this are cancelled
    hired_defaults: dict[str, Any] = field(default_factory=dict)  # HiRED options of requests that omit them


class State:
    """The app's live parts: backend (None while loading), slots, worker pool, metrics, jobs in flight."""

    def __init__(self, settings: Settings):
        self.settings = settings
        self.backend = None
        self.load_error: str | None = None
        self.model_name = settings.model_name
        self.slots = Slots(settings.max_concurrency, settings.max_queue)
        self.pool = ThreadPoolExecutor(settings.max_concurrency, thread_name_prefix="openai-worker")
        self.metrics = Metrics()
        self.jobs: set[Job] = set()
        self.created = int(time.time())

    async def work(self, fn, *args):
        return await asyncio.get_running_loop().run_in_executor(self.pool, fn, *args)


def create_app(load_backend, settings: Settings) -> FastAPI:
    """`load_backend()` (blocking, run in a thread at startup) returns a LocalBackend or RemoteBackend."""
    state = State(settings)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        async def load():
            try:
                backend = await asyncio.to_thread(load_backend)
            except Exception as e:  # reported by /health and every request; the process keeps answering
                state.load_error = f"{type(e).__name__}: {e}"
                log.error("loading the backend failed: %s", state.load_error)
                return
            state.model_name = state.model_name or backend.manifest.model.name
            state.backend = backend
            log.info("ready: model %s on the %s backend", state.model_name, backend.name)

        loader = asyncio.create_task(load())
        try:
            yield
        finally:
            for job in list(state.jobs):  # uvicorn waited shutdown_grace_s for them: cancel the rest
                job.cancel.set()
            await asyncio.gather(loader, return_exceptions=True)
            if state.backend is not None:
                await asyncio.to_thread(state.backend.close)  # a Pipeline waits for its requests in flight
            state.pool.shutdown(wait=True)

    app = FastAPI(title="hired-edge OpenAI-compatible API", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.hired = state

    @app.exception_handler(APIError)
    async def _api_error(request: Request, e: APIError):
        state.metrics.error(e.type if e.status != 429 else "rate_limit")
        headers = {"WWW-Authenticate": "Bearer"} if e.status == 401 else None
        return JSONResponse(e.body(), status_code=e.status, headers=headers)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, e: StarletteHTTPException):
        kind = "not_found_error" if e.status_code == 404 else "invalid_request_error"
        state.metrics.error(kind)
        return JSONResponse(
            APIError(e.status_code, str(e.detail), type=kind).body(), status_code=e.status_code
        )

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, e: Exception):
        log.exception("unexpected error")
        state.metrics.error("server_error")
        err = APIError(500, f"internal error ({type(e).__name__}); see the server log", type="server_error")
        return JSONResponse(err.body(), status_code=500)

    def authorize(request: Request) -> None:
        key = settings.api_key
        if key is None:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), key.encode()):
            raise APIError(401, "missing or wrong API key: send 'Authorization: Bearer <key>'",
                           type="authentication_error", code="invalid_api_key")  # fmt: skip

    def ready_backend():
        if state.backend is None:
            why = (
                f"the model failed to load ({state.load_error})"
                if state.load_error
                else "the model is loading"
            )
            raise APIError(503, f"{why}; retry when GET /health says ready", type="server_error",
                           code="model_not_ready")  # fmt: skip
        return state.backend

    @app.get("/health")
    async def health():
        if state.backend is None:
            status = "error" if state.load_error else "loading"
            return JSONResponse({"status": status, "error": state.load_error}, status_code=503)
        s = state.slots
        facts = {"model": state.model_name, "backend": state.backend.name, "running": s.running, "waiting": s.waiting}
        try:
            await asyncio.to_thread(state.backend.check_ready)  # a gateway: is the fleet there?
        except HiredError as e:
            return JSONResponse({"status": "backend unavailable", "error": str(e), **facts}, status_code=503)
        return {"status": "ready", **facts}

    @app.get("/metrics")
    async def metrics():
        state.metrics.set_load(state.slots.running, state.slots.waiting)
        body, content_type = state.metrics.render()
        return Response(body, media_type=content_type)

    @app.get("/v1/models")
    async def models(request: Request):
        authorize(request)
        ready_backend()
        return {"object": "list", "data": [_model_card(state)]}

    @app.get("/v1/models/{name:path}")
    async def model(name: str, request: Request):
        authorize(request)
        ready_backend()
        if name != state.model_name:
            raise APIError(404, f"model {name!r} does not exist; this server has {state.model_name!r}",
                           type="not_found_error", param="model", code="model_not_found")  # fmt: skip
        return _model_card(state)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        t0 = time.perf_counter()
        authorize(request)
        backend = ready_backend()
        req = parse_request(await _read_body(request, settings.max_body))
        if req.model is not None and req.model != state.model_name:
            raise APIError(404, f"model {req.model!r} does not exist; this server has {state.model_name!r}",
                           type="not_found_error", param="model", code="model_not_found")  # fmt: skip
        call = to_call(req, settings.hired_defaults)
        try:
            await state.slots.acquire()
        except Full as e:
            raise APIError(429, f"the server is busy ({e}); retry later", type="rate_limit_error",
                           code="server_busy") from None  # fmt: skip
        job = Job(backend, None, call.prompt, call.options, call.stop)
        state.jobs.add(job)
        try:
            # one worker hop: the image fetched and decoded, the request checked and prepared (bad input fails
            # here, before any header goes out) and, unless streamed, the whole answer
            watcher = None if call.stream else asyncio.create_task(_cancel_if_gone(request, job))
            try:
                await _run(state, _start, job, call, settings.images)
            finally:
                if watcher is not None:
                    watcher.cancel()
            if call.stream:
                response = _JobStream(state, job, _sse(state, job, call, t0))
                job = None  # the response owns it now (and frees the slot however it ends)
                return response
            state.metrics.done(job, t0)
            return _completion(state, job)
        finally:
            if job is not None:
                await _finish(state, job)

    return app


async def _cancel_if_gone(request: Request, job: Job, every_s: float = 0.1) -> None:
    """A non-streamed request whose client went away stops at its next token (its slot frees at once)."""
    while not await request.is_disconnected():
        await asyncio.sleep(every_s)
    job.cancel.set()


def _start(job: Job, call: Call, images: ImagePolicy) -> None:
    fetched = [images.fetch(url, "messages") for url in call.image_urls]
    if fetched:  # one image as itself (exactly Pipeline.generate(image, text)), several as a list
        job.image = fetched[0] if len(fetched) == 1 else fetched
    job.open()
    if not call.stream:
        while job.next_piece() is not None:
            pass


async def _run(state: State, fn, *args):
    """fn(*args) on the worker pool; runtime errors become OpenAI errors (bad input: 400)."""
    try:
        return await state.work(fn, *args)
    except APIError:
        raise
    except RemoteError as e:
        raise APIError(502, f"RemoteError: {e}", type="server_error", code="backend_unavailable") from None
    except GenerationError as e:
        if str(e).startswith(
            ("max_new_tokens", "min_new_tokens", "temperature", "top_p", "seed", "unknown option")
        ):
            raise bad_request(f"GenerationError: {e}") from None
        raise APIError(500, f"GenerationError: {e}", type="server_error") from None
    except PipelineClosedError as e:  # the server is shutting down
        raise APIError(503, f"{e}", type="server_error", code="shutting_down") from None
    except HiredError as e:  # ImageError, PromptError, BudgetError, ...: the request's fault
        raise bad_request(f"{type(e).__name__}: {e}", code=type(e).__name__) from None


async def _sse(state: State, job: Job, call: Call, t0: float):
    """The chat.completion.chunk events of a streamed reply, then `data: [DONE]`. A client that goes away makes
    Starlette cancel this generator; _JobStream then closes the Pipeline stream and frees the slot."""
    base = {"id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion.chunk", "created": int(time.time()),
            "model": state.model_name}  # fmt: skip
    extra = {"usage": None} if call.include_usage else {}

    def chunk(delta: dict, finish: str | None = None) -> bytes:
        c = {
            **base,
            "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}],
            **extra,
        }
        return b"data: " + json.dumps(c, ensure_ascii=False, separators=(",", ":")).encode() + b"\n\n"

    try:
        yield chunk({"role": "assistant", "content": ""})
        while True:
            piece = await _run(state, job.next_piece)
            if piece is None:
                break
            if piece:
                yield chunk({"content": piece})
        finish = "length" if job.finish_reason == "cancelled" else job.finish_reason
        yield chunk({}, finish)
        state.metrics.done(job, t0)
        if call.include_usage:
            tail = {**base, "choices": [], "usage": job.usage(), "hired": job.facts()}
            yield b"data: " + json.dumps(tail, separators=(",", ":")).encode() + b"\n\n"
    except APIError as e:  # after the headers went out: an error event, then the end
        state.metrics.error(e.type)
        yield b"data: " + json.dumps(e.body()).encode() + b"\n\n"
    await _finish(state, job)
    yield b"data: [DONE]\n\n"


class _JobStream(StreamingResponse):
    """A server-sent-event response that ends its job and frees its slot however it ends: finished, the client
    gone (Starlette cancels the body, maybe before it started), or the server shutting down."""

    def __init__(self, state: State, job: Job, body):
        super().__init__(body, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        self._state, self._job = state, job

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await _finish(self._state, self._job)


async def _finish(state: State, job: Job) -> None:
    """Close the job's stream (after a step in progress) and free its slot; once per job."""
    if job.finished:
        return
    job.finished = True
    state.jobs.discard(job)
    try:
        await asyncio.shield(state.work(job.close))
    finally:
        state.slots.release()


def _completion(state: State, job: Job) -> dict[str, Any]:
    finish = "length" if job.finish_reason == "cancelled" else job.finish_reason
    return {
        "id": f"chatcmpl-{uuid.uuid4().hex}",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": state.model_name,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": job.text, "refusal": None},
                "logprobs": None,
                "finish_reason": finish,
            }
        ],  # fmt: skip
        "usage": job.usage(),
        "hired": job.facts(),
    }


def _model_card(state: State) -> dict[str, Any]:
    return {"id": state.model_name, "object": "model", "created": state.created, "owned_by": "hired-edge"}


async def _read_body(request: Request, limit: int) -> bytes:
    """The request body, or 413 as soon as it is known to be over `limit` bytes (header or bytes received)."""
    length = request.headers.get("content-length", "")
    if length.isdigit() and int(length) > limit:
        raise APIError(413, f"the request body is {length} bytes, over this server's {limit}-byte limit",
                       code="request_too_large")  # fmt: skip
    chunks, total = [], 0
    async for chunk in request.stream():
        total += len(chunk)
        if total > limit:
            raise APIError(
                413, f"the request body is over this server's {limit}-byte limit", code="request_too_large"
            )
        chunks.append(chunk)
    return b"".join(chunks)


def allowed_files(path: str | None) -> Path | None:
    """--allow-files DIR as a checked folder path (None when not given)."""
    if path is None:
        return None
    p = Path(path).expanduser().resolve()
    if not p.is_dir():
        raise SystemExit(f"--allow-files {path}: not a folder")
    return p
