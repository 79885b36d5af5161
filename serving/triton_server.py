"""Serve a bundle over Triton's HTTP/gRPC (PyTriton) as the model `hired`; clients use RemotePipeline or tritonclient.

    python -m serving --artifacts artifacts/tiny                       # 127.0.0.1:8000 http, :8001 grpc, :8002 metrics
    python -m serving --artifacts DIR --host 0.0.0.0 --allow-remote    # reachable from other machines

Started from the main .venv (numpy 2), it first prepares the serving venv `.venv-serve` (numpy<2 + PyTriton,
once, about a minute; see serving.venv) and re-execs itself there, keeping its PID. The tensors and their meaning
are serving.protocol's.

Stopping: SIGINT or SIGTERM drains. The server stops taking new requests (they are refused at once as
unavailable), answers the requests already received (waiting at most --drain-timeout seconds), then stops
tritonserver and its Python stubs, removes their /dev/shm segments and its workspace, and exits 0.

Batching: Triton's dynamic batcher groups concurrent requests (up to --max-batch, waiting at most
--queue-delay-us) into one call of the model; it only groups requests whose image shapes are equal, because
variable-size inputs cannot be concatenated. Each request of a group is still its own `Pipeline.generate`
call: they run side by side on a pool of --max-batch threads (the Pipeline is thread-safe), never as one
tensor batch. A group runs to completion before the next starts (one model instance).
"""

from __future__ import annotations

import argparse
import ipaddress
import logging
import os
import shutil
import signal
import socket
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from runtime.errors import HiredError
from runtime.image import DEFAULT_MAX_PIXELS
from serving.protocol import INPUTS, MODEL_NAME, NUMPY_DTYPES, OUTPUTS, WireTensor, answer_requests

log = logging.getLogger("hired_edge.serving")


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
    max_pixels: int = DEFAULT_MAX_PIXELS
    allow_remote: bool = False
    drain_timeout: float = 30.0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m serving",
        description="Serve a hired-edge bundle as the Triton model `hired` (PyTriton: HTTP, gRPC, Prometheus metrics).",
        epilog="Clients: serving.RemotePipeline('127.0.0.1:8001') or any tritonclient. Stop with Ctrl+C or SIGTERM "
        "(requests in flight are answered first).",
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
    p.add_argument(
        "--max-pixels", type=int, default=DEFAULT_MAX_PIXELS, help="refuse larger images (default 64 Mpx)"
    )
    p.add_argument(
        "--drain-timeout",
        type=float,
        default=30.0,
        metavar="S",
        help="on SIGTERM/SIGINT, wait at most S seconds for requests in flight (default 30)",
    )
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
        threads=a.threads, max_pixels=a.max_pixels, allow_remote=a.allow_remote, drain_timeout=a.drain_timeout,
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
    if not 0 <= cfg.drain_timeout <= 3600:
        raise HiredError(f"--drain-timeout must be in 0..3600 seconds, got {cfg.drain_timeout}")


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
        received.append(signum)  # a second signal cuts the drain short
        stop.set()

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, on_signal)

    check_ports_free(cfg)
    t0 = time.monotonic()
    pipe = Pipeline.load(cfg.artifacts, provider=cfg.provider, threads=cfg.threads, max_pixels=cfg.max_pixels)
    executor = ThreadPoolExecutor(max_workers=cfg.max_batch, thread_name_prefix="hired-request")
    workspace = Path(tempfile.mkdtemp(prefix="hired-serve-"))
    triton = None
    stub_folders: list[Path] = []
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
        _send_empty_tensors(triton, say)
        if not stop.is_set():
            try:
                triton.run()
            except Exception as e:  # PyTriton's own errors: tritonserver died or never became ready
                first = (str(e).strip().splitlines() or [type(e).__name__])[0]
                say(f"error: tritonserver did not start ({type(e).__name__}: {first}); see its log above")
                return 1
            stub_folders = _stub_temp_folders()
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
            if received and triton.is_connected():
                drain(cfg, triton.get_access_token(), received, say=say)
            triton.stop()
            _remove_left_folders(stub_folders, say)
        executor.shutdown(wait=True, cancel_futures=True)
        pipe.close()
        shutil.rmtree(workspace, ignore_errors=True)
        why = f"on {signal.Signals(received[0]).name}" if received else "after an error"
        say(f"stopped {why} in {time.monotonic() - t_stop:.1f} s")
    return code


def drain(
    cfg: ServeConfig, access_token: str | None, received: list[int], *, say: Callable[[str], None]
) -> bool:
    """Stop taking requests and answer those received, waiting at most cfg.drain_timeout s. True when drained.

    Triton's unload takes the model out of service at once (a new request is refused: model not ready) while
    the requests it already holds, running or queued in the dynamic batcher, keep the model alive and are
    answered; then the model is finalized (its stub exits and removes its temp folders) and its queue gauge
    leaves /metrics, which is how the end is seen. A second SIGINT/SIGTERM stops waiting."""
    from pytriton.client.auth import create_auth_headers

    headers = create_auth_headers(access_token, "http") if access_token else {}
    host = {"0.0.0.0": "127.0.0.1", "::": "::1", "localhost": "127.0.0.1"}.get(cfg.host, cfg.host)
    host = f"[{host}]" if ":" in host else host
    t0 = time.monotonic()
    try:
        unload = urllib.request.Request(
            f"http://{host}:{cfg.http_port}/v2/repository/models/{MODEL_NAME}/unload",
            data=b"{}",
            headers={"Content-Type": "application/json", **headers},
            method="POST",
        )
        urllib.request.urlopen(unload, timeout=10).close()
        say(f"draining: new requests are refused; answering those received (at most {cfg.drain_timeout:g} s)")
        while _model_in_metrics(f"http://{host}:{cfg.metrics_port}/metrics"):
            if len(received) > 1:
                say("a second signal: stopping without waiting for the requests in flight")
                return False
            if time.monotonic() - t0 > cfg.drain_timeout:
                say(
                    f"--drain-timeout {cfg.drain_timeout:g} s passed with requests still running; stopping anyway"
                )
                return False
            time.sleep(0.1)
    except OSError as e:  # tritonserver already gone or not answering: nothing left to drain through it
        say(f"could not drain ({type(e).__name__}: {str(e).strip()[:200]}); stopping")
        return False
    say(f"drained in {time.monotonic() - t0:.1f} s")
    return True


def _model_in_metrics(url: str) -> bool:
    """True while Triton's /metrics has the model's queue gauge, which goes with the model once it is unloaded
    (failure counters of refused requests stay: they are not the model's)."""
    with urllib.request.urlopen(url, timeout=10) as response:
        text = response.read().decode("utf-8", "replace")
    return f'nv_inference_pending_request_count{{model="{MODEL_NAME}",' in text


# PyTriton's model code that runs in Triton's Python stub copies each request tensor into shared memory with
# `memoryview.cast("B")`, which raises for a view with a 0 in its shape: an image of 0 x W pixels failed there
# with HTTP 500 and a traceback before the protocol could answer it with the Pipeline's ImageError. That code
# reaches Triton as file text (Model.get_proxy_model_files); the empty frame is skipped there (nothing to copy).
_EMPTY_FRAME_COPY = 'shm.buf[offset + total_size : offset + total_size + frame.nbytes] = frame.cast("B")'


def _send_empty_tensors(triton, say: Callable[[str], None]) -> None:
    """Let zero-size request tensors (a [1, 0, 0, 3] image) reach the protocol: patch the stub's copy of data.py."""
    for model in triton._model_manager.models:
        original = model.get_proxy_model_files

        def files(original=original) -> dict[str, bytes]:
            out = dict(original())
            for key, text in out.items():
                if key.endswith("/data.py") and _EMPTY_FRAME_COPY.encode() in text:
                    line = next(ln for ln in text.decode().splitlines() if _EMPTY_FRAME_COPY in ln)
                    indent = line[: len(line) - len(line.lstrip())]
                    guarded = f"{indent}if frame.nbytes:\n{indent}    {line.lstrip()}"
                    out[key] = text.decode().replace(line, guarded).encode()
                    return out
            say(
                "warning: this PyTriton's data.py is not the one expected; zero-size images will fail in Triton"
            )
            return out

        model.get_proxy_model_files = files


def _stub_temp_folders() -> list[Path]:
    """The temp folders Triton's Python backend made for this server's model: the model copy named in the
    arguments of each stub under this process, and the (empty) `python_env_*` folder made beside it with it.
    A graceful unload removes them; a tritonserver stopped with requests still running leaves them."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rpartition(")")[2].split()
            children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
        except (OSError, ValueError, IndexError):
            continue
    todo, folders = [os.getpid()], []
    while todo:
        for pid in children.get(todo.pop(), []):
            todo.append(pid)
            try:
                args = (
                    (Path("/proc") / str(pid) / "cmdline").read_bytes().decode(errors="replace").split("\0")
                )
            except OSError:
                continue
            if args and args[0].endswith("triton_python_backend_stub"):
                folders += [Path(a).parents[1] for a in args[1:] if a.endswith("/1/model.py")]
    for copy in list(folders):
        try:
            made = copy.stat().st_ctime
            folders += [d for d in copy.parent.glob("python_env_*") if abs(d.stat().st_ctime - made) < 1]
        except OSError:
            continue
    return folders


def _remove_left_folders(folders: list[Path], say: Callable[[str], None]) -> None:
    """Remove what the stopped tritonserver left of `folders`: a model copy of ours, an empty python_env_*."""
    left = []
    for folder in folders:
        try:
            if folder.name.startswith("python_env_"):
                folder.rmdir()  # only when empty: never another server's environment
            elif f'name: "{MODEL_NAME}"' in (folder / "config.pbtxt").read_text():
                shutil.rmtree(folder)
            else:
                continue
            left.append(folder)
        except OSError:
            continue
    if left:
        say(f"removed {len(left)} temp folder(s) the stopped tritonserver left: {', '.join(map(str, left))}")


def _pytriton_tensor(tensor_cls, spec: WireTensor):
    return tensor_cls(name=spec.name, dtype=NUMPY_DTYPES[spec.dtype], shape=spec.dims, optional=spec.optional)


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)

    def say(msg: str) -> None:
        print(f"serving: {msg}", file=sys.stderr, flush=True)

    try:
        cfg = parse_args(args)
    except HiredError as e:
        say(f"error: {e}")
        return e.exit_code
    from serving import venv as serving_venv

    if not serving_venv.serving_ready():
        if os.environ.get(serving_venv.ENV_MARKER):
            say(
                f"error: {sys.prefix} was prepared as the serving environment but lacks pytriton or numpy<2; "
                f"delete it and run again to rebuild it"
            )
            return serving_venv.EXIT_ENV_FAILED
        from runtime.manifest import Manifest

        try:  # refuse a wrong --artifacts or a taken port before spending a minute on the environment
            Manifest.from_file(cfg.artifacts, verify=False)
            check_ports_free(cfg)
        except HiredError as e:
            say(f"error: {e}")
            return e.exit_code
        try:
            env_dir = serving_venv.ensure_env(say=say)
        except serving_venv.ServeEnvError as e:
            say(f"error: {e}")
            return serving_venv.EXIT_ENV_FAILED
        serving_venv.exec_into(env_dir, "serving", args)  # does not return
    logging.basicConfig(level=logging.WARNING, format="serving: %(name)s: %(message)s", stream=sys.stderr)
    _prepare_loader_path()
    try:
        return serve(cfg, say=say)
    except HiredError as e:
        say(f"error: {e}")
        return e.exit_code


def _prepare_loader_path() -> None:
    """Put this interpreter's libpython first for Triton's Python stub (needed when started without the re-exec)."""
    from serving.venv import libpython_dir

    libdir = libpython_dir()
    parts = [p for p in os.environ.get("LD_LIBRARY_PATH", "").split(os.pathsep) if p]
    if libdir and (not parts or parts[0] != libdir):
        os.environ["LD_LIBRARY_PATH"] = os.pathsep.join([libdir, *[p for p in parts if p != libdir]])
