"""Serving throughput and latency: the local Pipeline against `python -m serving` (gRPC and HTTP), same run.

    python -m bench.serve_bench --artifacts artifacts/tiny                  # 1 and 8 clients, 24 requests each
    python -m bench.serve_bench --artifacts DIR --clients 1 4 16 --requests 48 --json bench-results/serve.json

Every client is a thread sending one request after another (the same VGA frame, greedy, --max-new-tokens);
"local" threads share one in-process Pipeline, "served" threads share one RemotePipeline. The server is
started here on free loopback ports (its serving venv is created first if needed) and stopped at the end.
The OpenAI rows: `python -m serving.openai` (local backend) on a free port, asked through the official openai
client with the frame as a PNG data URL; "local Pipeline, PNG bytes" decodes the same PNG, so the difference
between those two rows is the front door's overhead (HTTP, JSON, base64, the event loop, the worker hop).
Server and clients share this machine's cores, so on a small CPU box the served numbers include the
clients' own work. Each row's requests run in --rounds interleaved rounds (engine order rotating), so a
change in the machine's load during the run hits every engine alike; the load average is printed. Prints a markdown table: requests/s over the whole run, p50/p95 latency per request.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from bench.images import synthetic_image

ROOT = Path(__file__).resolve().parent.parent
PROMPT = "What is in this picture?"


def percentile(values: Sequence[float], q: float) -> float:
    return float(np.percentile(np.asarray(values, dtype=np.float64), q)) if values else float("nan")


def run_clients(call: Callable[[], object], clients: int, requests: int) -> tuple[list[float], float]:
    """`requests` calls of `call` spread over `clients` threads: (latency of each call in ms, wall seconds)."""
    latencies: list[float] = []
    lock = threading.Lock()
    left = [requests]
    errors: list[BaseException] = []

    def worker():
        while True:
            with lock:
                if left[0] == 0 or errors:
                    return
                left[0] -= 1
            t = time.perf_counter()
            try:
                call()
            except BaseException as e:  # reported after the run, not swallowed
                with lock:
                    errors.append(e)
                return
            with lock:
                latencies.append((time.perf_counter() - t) * 1000)

    threads = [threading.Thread(target=worker) for _ in range(clients)]
    t0 = time.perf_counter()
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    wall = time.perf_counter() - t0
    if errors:
        raise RuntimeError(f"a request failed during the benchmark: {type(errors[0]).__name__}: {errors[0]}")
    return latencies, wall


def summarize(engine: str, clients: int, latencies: Sequence[float], wall_s: float) -> dict:
    return {
        "engine": engine,
        "clients": clients,
        "requests": len(latencies),
        "req_per_s": len(latencies) / wall_s,
        "p50_ms": percentile(latencies, 50),
        "p95_ms": percentile(latencies, 95),
        "wall_s": wall_s,
    }


def markdown(rows: Sequence[dict]) -> str:
    lines = [
        "| engine | clients | requests | req/s | p50 ms | p95 ms |",
        "| :--- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        lines.append(
            f"| {r['engine']} | {r['clients']} | {r['requests']} | {r['req_per_s']:.2f} | {r['p50_ms']:.0f} "
            f"| {r['p95_ms']:.0f} |"
        )
    return "\n".join(lines)


def free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


class Server:
    """`python -m serving` as a subprocess on free loopback ports; stopped with SIGTERM on exit."""

    def __init__(self, artifacts: str, max_batch: int):
        self.http, self.grpc, self.metrics = free_ports(3)
        self.log = tempfile.NamedTemporaryFile("w+", prefix="serve-bench-", suffix=".log", delete=False)
        cmd = [sys.executable, "-m", "serving", "--artifacts", artifacts, "--http-port", str(self.http),
               "--grpc-port", str(self.grpc), "--metrics-port", str(self.metrics), "--max-batch", str(max_batch)]  # fmt: skip
        self.proc = subprocess.Popen(cmd, cwd=ROOT, stdout=self.log, stderr=subprocess.STDOUT)

    def wait_ready(self, timeout_s: float = 300) -> None:
        from runtime.errors import RemoteError
        from serving import RemotePipeline

        deadline = time.monotonic() + timeout_s
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"python -m serving exited with {self.proc.returncode}; log: {self.log.name}")
            try:
                RemotePipeline(f"127.0.0.1:{self.grpc}", timeout_s=5).close()
                return
            except RemoteError:
                if time.monotonic() > deadline:
                    raise RuntimeError(
                        f"python -m serving not ready in {timeout_s:.0f} s; log: {self.log.name}"
                    ) from None
                time.sleep(0.3)

    def stop(self) -> None:
        stop_process(self.proc)
        self.log.close()


class OpenAIServer:
    """`python -m serving.openai` (local backend) as a subprocess on a free loopback port; `ask` is one greedy
    chat request with the image as a PNG data URL, through the official openai client."""

    def __init__(self, artifacts: str, max_concurrency: int):
        (self.port,) = free_ports(1)
        self.log = tempfile.NamedTemporaryFile("w+", prefix="openai-bench-", suffix=".log", delete=False)
        cmd = [sys.executable, "-m", "serving.openai", "--artifacts", artifacts, "--port", str(self.port),
               "--max-concurrency", str(max_concurrency), "--log-level", "warning"]  # fmt: skip
        self.proc = subprocess.Popen(cmd, cwd=ROOT, stdout=self.log, stderr=subprocess.STDOUT)
        self.client = self.model = None

    def wait_ready(self, timeout_s: float = 300) -> None:
        import httpx
        import openai

        url = f"http://127.0.0.1:{self.port}"
        deadline = time.monotonic() + timeout_s
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"serving.openai exited with {self.proc.returncode}; log: {self.log.name}")
            try:
                if httpx.get(f"{url}/health", timeout=5).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"serving.openai not ready in {timeout_s:.0f} s; log: {self.log.name}")
            time.sleep(0.3)
        limits = httpx.Limits(max_connections=64, max_keepalive_connections=64)
        self.client = openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0,
                                    http_client=httpx.Client(limits=limits, timeout=300))  # fmt: skip
        self.model = self.client.models.list().data[0].id

    def ask(self, image_png: bytes, prompt: str, max_new_tokens: int):
        url = "data:image/png;base64," + base64.b64encode(image_png).decode()
        content = [{"type": "text", "text": prompt}, {"type": "image_url", "image_url": {"url": url}}]
        messages = [{"role": "user", "content": content}]
        return self.client.chat.completions.create(
            model=self.model, messages=messages, max_tokens=max_new_tokens, temperature=0
        )

    def stop(self) -> None:
        if self.client is not None:
            self.client.close()
        stop_process(self.proc)
        self.log.close()


def stop_process(proc: subprocess.Popen, grace_s: float = 60) -> None:
    """SIGTERM a server we started, wait for its clean exit, kill it after `grace_s`."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(grace_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def png_bytes(image: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return buf.getvalue()


def bench(artifacts: str, *, clients: Sequence[int], requests: int, max_new_tokens: int, height: int, width: int,
          warmup: int = 2, rounds: int = 3, say: Callable[[str], None] = print) -> list[dict]:  # fmt: skip
    from runtime.pipeline import Pipeline
    from serving import RemotePipeline

    image = synthetic_image(width=width, height=height)
    server = Server(artifacts, max_batch=max(clients))
    front = OpenAIServer(artifacts, max_concurrency=max(clients))
    png = png_bytes(image)  # what an OpenAI client sends; the "PNG" local row decodes the same bytes
    rows = []
    try:
        with Pipeline.load(artifacts) as pipe:
            want = pipe.generate(image, PROMPT, max_new_tokens=max_new_tokens).token_ids
            say(f"local Pipeline loaded ({pipe.provider}); waiting for the server (log: {server.log.name})")
            server.wait_ready()
            front.wait_ready()
            answer = front.ask(png, PROMPT, max_new_tokens)
            alone = pipe.generate(png, PROMPT, max_new_tokens=max_new_tokens)
            got = (answer.choices[0].message.content, answer.usage.completion_tokens)
            if got != (alone.text, len(alone.token_ids)):
                raise RuntimeError(f"the OpenAI API gave (text, tokens) {got}, the local Pipeline {alone.text!r}")
            remotes = {
                "served, gRPC": RemotePipeline(f"127.0.0.1:{server.grpc}"),
                "served, HTTP": RemotePipeline(f"http://127.0.0.1:{server.http}"),
            }
            for name, remote in remotes.items():
                got = remote.generate(image, PROMPT, max_new_tokens=max_new_tokens).token_ids
                if got != want:
                    raise RuntimeError(f"{name} gave tokens {got}, the local Pipeline {want}")
            engines = {"local Pipeline": pipe, **remotes}
            for n in clients:
                calls = {
                    name: (
                        lambda engine=engine: engine.generate(image, PROMPT, max_new_tokens=max_new_tokens)
                    )
                    for name, engine in engines.items()
                }
                calls["local Pipeline, PNG bytes"] = lambda: pipe.generate(png, PROMPT, max_new_tokens=max_new_tokens)
                calls["OpenAI API, PNG data URL"] = lambda: front.ask(png, PROMPT, max_new_tokens)
                for call in calls.values():
                    for _ in range(warmup):
                        call()
                # rounds, engine order rotating, so a change in the machine's load hits every engine alike
                measured = {name: ([], 0.0) for name in calls}
                per_round = [requests // rounds + (1 if r < requests % rounds else 0) for r in range(rounds)]
                names = list(calls)
                for r, count in enumerate(per_round):
                    for name in names[r % len(names) :] + names[: r % len(names)]:
                        lat, wall = run_clients(calls[name], n, count)
                        measured[name] = (measured[name][0] + lat, measured[name][1] + wall)
                for name, (lat, wall) in measured.items():
                    row = summarize(name, n, lat, wall)
                    say(f"{name}, {n} client(s): {row['req_per_s']:.2f} req/s, p50 {row['p50_ms']:.0f} ms")
                    rows.append(row)
            for remote in remotes.values():
                remote.close()
    finally:
        server.stop()
        front.stop()
    return rows


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.serve_bench", description=__doc__.splitlines()[0])
    p.add_argument("--artifacts", required=True, metavar="DIR", help="bundle folder (e.g. artifacts/tiny)")
    p.add_argument("--clients", type=int, nargs="+", default=[1, 8], help="concurrent clients (default: 1 8)")
    p.add_argument("--requests", type=int, default=24, help="timed requests per engine and client count")
    p.add_argument("--max-new-tokens", type=int, default=8, help="new tokens per request (default 8)")
    p.add_argument("--size", default="480x640", metavar="HxW", help="frame height x width (default 480x640)")
    p.add_argument(
        "--rounds", type=int, default=3, help="interleaved rounds per row (default 3; evens out load)"
    )
    p.add_argument("--json", metavar="PATH", help="also write the rows as JSON")
    a = p.parse_args(argv)
    height, width = (int(v) for v in a.size.lower().split("x"))
    say = lambda msg: print(f"[serve_bench] {msg}", file=sys.stderr, flush=True)  # noqa: E731
    load_before = os.getloadavg()[0]
    rows = bench(a.artifacts, clients=a.clients, requests=a.requests, max_new_tokens=a.max_new_tokens,
                 height=height, width=width, rounds=a.rounds, say=say)  # fmt: skip
    print(
        f"\n{height}x{width} frame, {a.max_new_tokens} new tokens, greedy; {a.requests} timed requests per row; "
        f"{os.cpu_count()} CPUs, 1-min load average {load_before:.1f} before, {os.getloadavg()[0]:.1f} after\n"
    )
    print(markdown(rows))
    if a.json:
        Path(a.json).parent.mkdir(parents=True, exist_ok=True)
        Path(a.json).write_text(json.dumps(rows, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
