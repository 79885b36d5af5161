"""Serve a bundle over Triton's HTTP/gRPC (PyTriton) as the model `hired`; clients use RemotePipeline or tritonclient.

    python -m runtime.serve --artifacts artifacts/tiny                       # 127.0.0.1:8000 http, :8001 grpc, :8002 metrics
    python -m runtime.serve --artifacts DIR --host 0.0.0.0 --allow-remote    # reachable from other machines

Started from the main .venv (numpy 2), it first prepares the serving venv `.venv-serve` (numpy<2 + PyTriton,
once, about a minute; see runtime.serve_env) and re-execs itself there, keeping its PID. SIGINT or SIGTERM
stops it cleanly: tritonserver and its Python stubs exit, their /dev/shm segments and the workspace go.

The model `hired` (Triton's KServe v2 protocol; max_batch_size > 0, so every tensor has a leading batch dim):
  inputs   image          UINT8  [-1, -1, 3]  RGB, channels last        } exactly one of the two
           image_bytes    BYTES  [1]          an encoded PNG/JPEG/...   }
           prompt         BYTES  [1]          UTF-8 text
           options        BYTES  [1]          optional JSON object of generate() keywords (RemotePipeline sends this)
           budget, alpha, temperature, top_p  FP64 [1];  max_new_tokens INT32 [1];  seed INT64 [1];
           distribution, newlines  BYTES [1]  optional plain tensors for plain tritonclient users
  outputs  text BYTES [1]; token_ids INT64 [-1] (-1 pads rows of a multi-row request); visual_tokens_kept,
           visual_tokens_before INT32 [1]; result_json BYTES [1] (GenerationResult.to_dict() as JSON);
           error BYTES [1]: "" when ok, else "<ErrorClass>: <message>" of runtime.errors (ImageError, ...)
Floats are FP64 so that budget=0.3 arrives as 0.3 and the server computes what the local Pipeline computes.

Batching: Triton's dynamic batcher groups concurrent requests (up to --max-batch, waiting at most
--queue-delay-us) into one call of the model; it only groups requests whose image shapes are equal, because
variable-size inputs cannot be concatenated. Each request of a group is still its own `Pipeline.generate`
call: they run side by side on a pool of --max-batch threads (the Pipeline is thread-safe), never as one
tensor batch. A group runs to completion before the next starts (one model instance).
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import logging
import os
import shutil
import signal
import socket
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from runtime import errors as _errors
from runtime.errors import GenerationError, HiredError, ImageError, PromptError, RemoteError

log = logging.getLogger("hired_edge.serve")

MODEL_NAME = "hired"
OPTION_KEYS = (
    "budget",
    "alpha",
    "distribution",
    "newlines",
    "max_new_tokens",
    "temperature",
    "top_p",
    "seed",
)


@dataclass(frozen=True)
class TensorSpec:
    """One input or output of the `hired` model; dims exclude the batch dim."""

    name: str
    dtype: str  # Triton's name: UINT8, BYTES, FP64, INT32, INT64
    dims: tuple[int, ...]
    optional: bool = False


INPUTS = (
    TensorSpec("image", "UINT8", (-1, -1, 3), optional=True),
    TensorSpec("image_bytes", "BYTES", (1,), optional=True),
    TensorSpec("prompt", "BYTES", (1,)),
    TensorSpec("options", "BYTES", (1,), optional=True),
    TensorSpec("budget", "FP64", (1,), optional=True),
    TensorSpec("alpha", "FP64", (1,), optional=True),
    TensorSpec("distribution", "BYTES", (1,), optional=True),
    TensorSpec("newlines", "BYTES", (1,), optional=True),
    TensorSpec("max_new_tokens", "INT32", (1,), optional=True),
    TensorSpec("temperature", "FP64", (1,), optional=True),
    TensorSpec("top_p", "FP64", (1,), optional=True),
    TensorSpec("seed", "INT64", (1,), optional=True),
)
OUTPUTS = (
    TensorSpec("text", "BYTES", (1,)),
    TensorSpec("token_ids", "INT64", (-1,)),
    TensorSpec("visual_tokens_kept", "INT32", (1,)),
    TensorSpec("visual_tokens_before", "INT32", (1,)),
    TensorSpec("result_json", "BYTES", (1,)),
    TensorSpec("error", "BYTES", (1,)),
)
NUMPY_DTYPES = {
    "UINT8": np.uint8,
    "BYTES": np.bytes_,
    "FP64": np.float64,
    "INT32": np.int32,
    "INT64": np.int64,
}


# ---- the protocol: request rows -> generate() arguments -> output tensors (pure, shared with the Triton repo) --
@dataclass(frozen=True)
class Call:
    """One generation asked for by one row of a request."""

    image: Any  # uint8 [H, W, 3] or encoded bytes
    prompt: str
    options: dict[str, Any]


def parse_row(data: dict[str, np.ndarray], row: int) -> Call:
    """The generate() arguments of row `row` of a request's inputs (arrays with a leading batch dim)."""
    has_array, has_bytes = "image" in data, "image_bytes" in data
    if has_array and has_bytes:
        raise ImageError(
            "the request has both image and image_bytes; send one image: the array or the encoded file"
        )
    if not has_array and not has_bytes:
        raise ImageError(
            "the request has no image; send image (uint8 [1, H, W, 3]) or image_bytes (a PNG/JPEG file)"
        )
    image = data["image"][row] if has_array else _bytes(data["image_bytes"][row])
    raw_prompt = _bytes(data["prompt"][row])
    try:  # surrogatepass: a lone surrogate (sent by RemotePipeline) reaches the Pipeline's own PromptError
        prompt = raw_prompt.decode("utf-8", "surrogatepass")
    except UnicodeDecodeError as e:
        raise PromptError(
            f"prompt is not valid UTF-8 ({e.reason} at byte {e.start}); send UTF-8 text"
        ) from None
    options = _json_options(data["options"][row]) if "options" in data else {}
    for key in OPTION_KEYS:
        if key not in data:
            continue
        if key in options:
            raise GenerationError(f"{key} was sent both as a tensor and in options; send it once")
        value = data[key][row].reshape(-1)[0]
        options[key] = (
            _bytes(value).decode("utf-8", "replace") if data[key].dtype.kind in "SOU" else value.item()
        )
    return Call(image=image, prompt=prompt, options=options)


def _bytes(value: Any) -> bytes:
    """The bytes of one BYTES element (PyTriton hands them as np.bytes_, object arrays of bytes, or [1] arrays)."""
    if isinstance(value, np.ndarray):
        value = value.reshape(-1)[0]
    if isinstance(value, bytes):
        return bytes(value)
    if isinstance(value, str):
        return value.encode("utf-8")
    raise GenerationError(f"expected a BYTES element, got {type(value).__name__}")


def _json_options(cell: np.ndarray) -> dict[str, Any]:
    text = _bytes(cell)
    try:
        options = json.loads(text) if text.strip() else {}
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise GenerationError(
            f'options is not valid JSON ({e}); send a JSON object such as {{"budget": 0.2}}'
        ) from None
    if not isinstance(options, dict):
        raise GenerationError(f"options must be a JSON object, got {type(options).__name__}")
    unknown = sorted(set(options) - set(OPTION_KEYS))
    if unknown:
        raise GenerationError(
            f"unknown option(s) {', '.join(unknown)}; the options are {', '.join(OPTION_KEYS)}"
        )
    return options


def encode_options(options: dict[str, Any]) -> bytes:
    """JSON of generate() keywords, exact for floats (repr round-trips), numpy scalars as Python numbers."""

    def plain(value):
        if isinstance(value, np.generic):
            return value.item()
        return repr(value)  # an object JSON cannot carry: the server refuses its repr with the usual message

    return json.dumps(options, default=plain, allow_nan=True).encode("utf-8")


def format_error(exc: BaseException) -> str:
    """'ImageError: <message>' for the runtime's typed errors; anything else is a RemoteError naming the bug."""
    if isinstance(exc, HiredError) and getattr(_errors, type(exc).__name__, None) is type(exc):
        return f"{type(exc).__name__}: {exc}"
    first = (str(exc).strip().splitlines() or [""])[0]
    return (
        f"RemoteError: the server failed on this request ({type(exc).__name__}: {first}); see the server log"
    )


def parse_error(text: str) -> HiredError:
    """The typed error of an `error` output: the same class and message as the server raised."""
    name, sep, message = text.partition(": ")
    cls = getattr(_errors, name, None) if sep else None
    if isinstance(cls, type) and issubclass(cls, HiredError):
        return cls(message)
    return RemoteError(f"the server answered an unknown error: {text}")


def encode_outcomes(outcomes: Sequence[Any]) -> dict[str, np.ndarray]:
    """Output tensors of one request from its rows' outcomes (GenerationResult or exception), batch dim first."""
    n = len(outcomes)
    ok = [o for o in outcomes if not isinstance(o, BaseException)]
    width = max([1, *(len(o.token_ids) for o in ok)])  # PyTriton cannot send a zero-size tensor: -1 pads
    out = {
        "text": np.empty((n, 1), dtype=object),
        "token_ids": np.full((n, width), -1, dtype=np.int64),
        "visual_tokens_kept": np.zeros((n, 1), dtype=np.int32),
        "visual_tokens_before": np.zeros((n, 1), dtype=np.int32),
        "result_json": np.empty((n, 1), dtype=object),
        "error": np.empty((n, 1), dtype=object),
    }
    for i, o in enumerate(outcomes):
        if isinstance(o, BaseException):
            out["text"][i, 0] = out["result_json"][i, 0] = b""
            out["error"][i, 0] = format_error(o).encode("utf-8")
            continue
        out["text"][i, 0] = o.text.encode("utf-8")
        out["token_ids"][i, : len(o.token_ids)] = o.token_ids
        out["visual_tokens_kept"][i, 0] = o.visual_tokens["kept"]
        out["visual_tokens_before"][i, 0] = o.visual_tokens["before"]
        out["result_json"][i, 0] = json.dumps(o.to_dict(), separators=(",", ":")).encode("utf-8")
        out["error"][i, 0] = b""
    return out


def run_call(generate: Callable[..., Any], data: dict[str, np.ndarray], row: int) -> Any:
    """One row through `generate` (Pipeline.generate); returns the GenerationResult or the exception raised."""
    try:
        call = parse_row(data, row)
        return generate(call.image, call.prompt, **call.options)
    except HiredError as e:
        return e
    except Exception as e:  # a bug, not bad input: keep serving, tell the client, log the traceback here
        log.error("request failed:\n%s", traceback.format_exc())
        return e


def answer_requests(
    generate: Callable[..., Any], requests: Sequence[dict[str, np.ndarray]], executor: Executor | None = None
) -> list[dict[str, np.ndarray]]:
    """Output dicts for a group of requests; every row is its own generate() call, run on `executor` if given."""
    rows = [(r, i) for r, data in enumerate(requests) for i in range(_batch_size(data))]
    if executor is None:
        outcomes = [run_call(generate, requests[r], i) for r, i in rows]
    else:
        futures = [executor.submit(run_call, generate, requests[r], i) for r, i in rows]
        outcomes = [f.result() for f in futures]
    per_request: list[list[Any]] = [[] for _ in requests]
    for (r, _), outcome in zip(rows, outcomes):
        per_request[r].append(outcome)
    return [encode_outcomes(o) for o in per_request]


def _batch_size(data: dict[str, np.ndarray]) -> int:
    return int(data["prompt"].shape[0]) if "prompt" in data else 1


# ---- the command line ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ServeConfig:
    artifacts: str
    host: str = "127.0.0.1"
    http_port: int = 8000
    grpc_port: int = 8001
    metrics_port: int = 8002
    max_batch: int = 8
    queue_delay_us: int = 1000
    provider: str = "cpu"
    threads: int | None = None
    max_pixels: int = 64_000_000
    allow_remote: bool = False


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m runtime.serve",
        description="Serve a hired-edge bundle as the Triton model `hired` (PyTriton: HTTP, gRPC, Prometheus metrics).",
        epilog="Clients: runtime.RemotePipeline('127.0.0.1:8001') or any tritonclient. Stop with Ctrl+C or SIGTERM.",
    )
    p.add_argument(
        "--artifacts", required=True, metavar="DIR", help="bundle folder written by `python -m export`"
    )
    p.add_argument(
        "--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)"
    )
    p.add_argument("--http-port", type=int, default=8000, metavar="P", help="HTTP port (default 8000)")
    p.add_argument("--grpc-port", type=int, default=8001, metavar="P", help="gRPC port (default 8001)")
    p.add_argument(
        "--metrics-port", type=int, default=8002, metavar="P", help="Prometheus /metrics port (default 8002)"
    )
    p.add_argument(
        "--max-batch",
        type=int,
        default=8,
        metavar="N",
        help="dynamic batching: at most N requests per group, run side by side (default 8)",
    )
    p.add_argument(
        "--queue-delay-us",
        type=int,
        default=1000,
        metavar="US",
        help="dynamic batching: wait at most US microseconds to fill a group (default 1000)",
    )
    p.add_argument(
        "--provider",
        choices=("cpu", "cuda", "tensorrt"),
        default="cpu",
        help="onnxruntime execution provider (cuda/tensorrt fall back to CPU with a warning)",
    )
    p.add_argument(
        "--threads", type=int, metavar="N", help="onnxruntime intra-op threads per graph (default: ORT's)"
    )
    p.add_argument("--max-pixels", type=int, default=64_000_000, help="refuse larger images (default 64 Mpx)")
    p.add_argument(
        "--allow-remote",
        action="store_true",
        help="required for any --host other than loopback: inference has no authentication",
    )
    return p  # fmt: skip


def parse_args(argv: Sequence[str] | None = None) -> ServeConfig:
    a = build_parser().parse_args(argv)
    cfg = ServeConfig(
        artifacts=a.artifacts, host=a.host, http_port=a.http_port, grpc_port=a.grpc_port,
        metrics_port=a.metrics_port, max_batch=a.max_batch, queue_delay_us=a.queue_delay_us, provider=a.provider,
        threads=a.threads, max_pixels=a.max_pixels, allow_remote=a.allow_remote,
    )  # fmt: skip
    check_config(cfg)
    return cfg


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_config(cfg: ServeConfig) -> None:
    """Refuse a non-loopback bind without --allow-remote, bad ports and batch sizes (HiredError, one line)."""
    if not is_loopback(cfg.host) and not cfg.allow_remote:
        raise HiredError(
            f"--host {cfg.host} would expose the server beyond this machine, and inference has no authentication; "
            "add --allow-remote to confirm, or use --host 127.0.0.1"
        )
    ports = {"--http-port": cfg.http_port, "--grpc-port": cfg.grpc_port, "--metrics-port": cfg.metrics_port}
    for flag, port in ports.items():
        if not 1 <= port <= 65535:
            raise HiredError(f"{flag} must be in 1..65535, got {port}")
    if len(set(ports.values())) != 3:
        raise HiredError(f"the HTTP, gRPC and metrics ports must differ, got {sorted(ports.values())}")
    if not 1 <= cfg.max_batch <= 1024:
        raise HiredError(f"--max-batch must be in 1..1024, got {cfg.max_batch}")
    if cfg.queue_delay_us < 0:
        raise HiredError(f"--queue-delay-us must be >= 0, got {cfg.queue_delay_us}")


def check_ports_free(cfg: ServeConfig) -> None:
    """Refuse ports something else holds, before tritonserver fails on them (PyTriton would wait minutes)."""
    ports = {"--http-port": cfg.http_port, "--grpc-port": cfg.grpc_port, "--metrics-port": cfg.metrics_port}
    for flag, port in ports.items():
        try:
            family, _, _, _, address = socket.getaddrinfo(cfg.host, port, type=socket.SOCK_STREAM)[0]
            with socket.socket(family, socket.SOCK_STREAM) as probe:
                probe.setsockopt(
                    socket.SOL_SOCKET, socket.SO_REUSEADDR, 1
                )  # as servers do: TIME_WAIT is fine
                probe.bind(address)
        except OSError as e:
            raise HiredError(
                f"{flag} {port}: cannot listen on {cfg.host}:{port} ({e.strerror or e}); "
                "pick a free port or stop what holds it"
            ) from None


def serve(cfg: ServeConfig, *, say: Callable[[str], None]) -> int:
    """Load the bundle, serve it until SIGINT/SIGTERM (or tritonserver dies), then clean up. Returns an exit code."""
    from concurrent.futures import ThreadPoolExecutor

    from pytriton.model_config import DynamicBatcher, ModelConfig, Tensor
    from pytriton.triton import Triton, TritonConfig

    from runtime.pipeline import Pipeline

    stop = threading.Event()
    received: list[int] = []

    def on_signal(signum, _frame):
        received.append(signum)
        stop.set()

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, on_signal)

    check_ports_free(cfg)
    t0 = time.monotonic()
    pipe = Pipeline.load(cfg.artifacts, provider=cfg.provider, threads=cfg.threads, max_pixels=cfg.max_pixels)
    executor = ThreadPoolExecutor(max_workers=cfg.max_batch, thread_name_prefix="hired-request")
    workspace = Path(tempfile.mkdtemp(prefix="hired-serve-"))
    triton = None
    code = 0
    try:
        if stop.is_set():
            return 0
        triton = Triton(
            config=TritonConfig(
                http_address=cfg.host, http_port=cfg.http_port, grpc_address=cfg.host, grpc_port=cfg.grpc_port,
                metrics_address=cfg.host, metrics_port=cfg.metrics_port, allow_gpu_metrics=cfg.provider != "cpu",
                exit_timeout_secs=5, log_verbose=0,
            ),
            workspace=workspace / "pytriton",
        )  # fmt: skip

        def infer(requests):
            return answer_requests(pipe.generate, [r.data for r in requests], executor)

        triton.bind(
            model_name=MODEL_NAME,
            infer_func=infer,
            inputs=[_pytriton_tensor(Tensor, s) for s in INPUTS],
            outputs=[_pytriton_tensor(Tensor, s) for s in OUTPUTS],
            config=ModelConfig(
                batching=True,
                max_batch_size=cfg.max_batch,
                batcher=DynamicBatcher(max_queue_delay_microseconds=cfg.queue_delay_us),
            ),
        )
        if not stop.is_set():
            try:
                triton.run()
            except Exception as e:  # PyTriton's own errors: tritonserver died or never became ready
                first = (str(e).strip().splitlines() or [type(e).__name__])[0]
                say(f"error: tritonserver did not start ({type(e).__name__}: {first}); see its log above")
                return 1
            say(
                f"serving {cfg.artifacts} as model '{MODEL_NAME}' ({pipe.provider}) in {time.monotonic() - t0:.1f} s: "
                f"grpc {cfg.host}:{cfg.grpc_port}, http://{cfg.host}:{cfg.http_port}, "
                f"metrics http://{cfg.host}:{cfg.metrics_port}/metrics; max batch {cfg.max_batch}; "
                "stop with Ctrl+C or SIGTERM"
            )
        while not stop.wait(0.25):
            if not triton.is_alive():
                say("tritonserver or the model stopped unexpectedly; shutting down (see the log above)")
                code = 1
                break
    finally:
        t_stop = time.monotonic()
        if triton is not None:
            triton.stop()
        executor.shutdown(wait=True, cancel_futures=True)
        pipe.close()
        shutil.rmtree(workspace, ignore_errors=True)
        why = f"on {signal.Signals(received[0]).name}" if received else "after an error"
        say(f"stopped {why} in {time.monotonic() - t_stop:.1f} s")
    return code


def _pytriton_tensor(tensor_cls, spec: TensorSpec):
    return tensor_cls(name=spec.name, dtype=NUMPY_DTYPES[spec.dtype], shape=spec.dims, optional=spec.optional)


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)

    def say(msg: str) -> None:
        print(f"runtime.serve: {msg}", file=sys.stderr, flush=True)

    try:
        cfg = parse_args(args)
    except HiredError as e:
        say(f"error: {e}")
        return e.exit_code
    from runtime import serve_env

    if not serve_env.serving_ready():
        if os.environ.get(serve_env.ENV_MARKER):
            say(
                f"error: {sys.prefix} was prepared as the serving environment but lacks pytriton or numpy<2; "
                f"delete it and run again to rebuild it"
            )
            return serve_env.EXIT_ENV_FAILED
        from runtime.manifest import Manifest

        try:  # refuse a wrong --artifacts or a taken port before spending a minute on the environment
            Manifest.from_file(cfg.artifacts, verify=False)
            check_ports_free(cfg)
        except HiredError as e:
            say(f"error: {e}")
            return e.exit_code
        try:
            env_dir = serve_env.ensure_env(say=say)
        except serve_env.ServeEnvError as e:
            say(f"error: {e}")
            return serve_env.EXIT_ENV_FAILED
        serve_env.exec_into(env_dir, "runtime.serve", args)  # does not return
    logging.basicConfig(
        level=logging.WARNING, format="runtime.serve: %(name)s: %(message)s", stream=sys.stderr
    )
    _prepare_loader_path()
    try:
        return serve(cfg, say=say)
    except HiredError as e:
        say(f"error: {e}")
        return e.exit_code


def _prepare_loader_path() -> None:
    """Put this interpreter's libpython first for Triton's Python stub (needed when started without the re-exec)."""
    from runtime.serve_env import libpython_dir

    libdir = libpython_dir()
    parts = [p for p in os.environ.get("LD_LIBRARY_PATH", "").split(os.pathsep) if p]
    if libdir and (not parts or parts[0] != libdir):
        os.environ["LD_LIBRARY_PATH"] = os.pathsep.join([libdir, *[p for p in parts if p != libdir]])


if __name__ == "__main__":
    sys.exit(main())
