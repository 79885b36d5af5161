"""Helpers of the serving tests: free loopback ports, seeded pictures, and `python -m serving` as a subprocess."""

from __future__ import annotations

import io
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
READY_TIMEOUT_S = 180


def free_ports(n: int) -> list[int]:
    """n loopback TCP ports free right now (bound to port 0, then released)."""
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def picture(height: int, width: int, seed: int = 0) -> np.ndarray:
    """A seeded uint8 [H, W, 3] picture with blocks, so attention is not uniform."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    img = np.stack([x * 255 // max(width - 1, 1), y * 255 // max(height - 1, 1), (x + y) % 256], -1)
    for _ in range(5):
        y0, x0 = rng.integers(0, height), rng.integers(0, width)
        img[y0 : y0 + height // 4, x0 : x0 + width // 4] = rng.integers(0, 256, 3)
    return img.astype(np.uint8)


def png_bytes(rgb: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="PNG")
    return buf.getvalue()


def comparable(result) -> dict:
    """Everything of a GenerationResult but the timings, which differ run to run."""
    d = result.to_dict()
    d.pop("timings_ms")
    return d


def serving_venv_or_skip():
    """The serving venv (.venv-serve, created on first use: about a minute); skips naming why it cannot be made."""
    from serving import venv

    try:
        return venv.ensure_env()
    except venv.ServeEnvError as e:
        pytest.skip(f"the serving venv could not be created: {e}")


@dataclass
class ServerProcess:
    """`python -m serving` started by `start_server`; its ports, log and process."""

    proc: subprocess.Popen
    http: int
    grpc: int
    metrics: int
    log: Path

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")

    def stop(self, timeout: float = 60) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


def start_server(bundle: Path, log_path: Path, *flags: str) -> ServerProcess:
    """Start `python -m serving` on free loopback ports and wait until model `hired` is ready (fails naming why)."""
    from runtime.errors import RemoteError
    from serving import RemotePipeline

    serving_venv_or_skip()
    http, grpc, metrics = free_ports(3)
    cmd = [sys.executable, "-m", "serving", "--artifacts", str(bundle), "--http-port", str(http),
           "--grpc-port", str(grpc), "--metrics-port", str(metrics), *flags]  # fmt: skip
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env=dict(os.environ))
    server = ServerProcess(proc, http, grpc, metrics, log_path)
    deadline = time.monotonic() + READY_TIMEOUT_S
    while True:
        if proc.poll() is not None:
            pytest.fail(f"python -m serving exited with {proc.returncode}:\n{server.log_text()[-3000:]}")
        try:
            RemotePipeline(f"127.0.0.1:{grpc}", timeout_s=5).close()
            return server
        except RemoteError:
            if time.monotonic() > deadline:
                server.stop()
                pytest.fail(
                    f"python -m serving not ready in {READY_TIMEOUT_S} s:\n{server.log_text()[-3000:]}"
                )
            time.sleep(0.3)
