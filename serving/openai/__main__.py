"""python -m serving.openai: the OpenAI-compatible server (`/v1/chat/completions`) for a bundle.

    python -m serving.openai --artifacts artifacts/tiny                       # http://127.0.0.1:8080/v1
    python -m serving.openai --artifacts DIR --backend grpc://10.0.0.5:8001   # gateway to a Triton fleet
    python -m serving.openai --artifacts DIR --host 0.0.0.0 --allow-remote --api-key "$KEY"

Loopback only unless --allow-remote. SIGTERM or Ctrl+C: no new requests; those in flight finish (or are
cancelled after --shutdown-grace seconds), then the process exits 0.
"""

from __future__ import annotations

import argparse
import ipaddress
import logging
import os
import signal
import sys
from collections.abc import Sequence

import uvicorn

from hired import HiredConfig
from runtime.errors import HiredError
from runtime.options import RequestOptions
from serving.openai.app import DEFAULT_MAX_BODY, Settings, allowed_files, create_app
from serving.openai.images import DEFAULT_MAX_BYTES, DEFAULT_TIMEOUT_S, ImagePolicy

MB = 1024 * 1024


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m serving.openai", description=__doc__.split("\n")[0])
    p.add_argument("--artifacts", required=True, help="the bundle folder (the remote backend reads its tokenizer)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1; another needs --allow-remote)")
    p.add_argument("--port", type=int, default=8080, help="default 8080")
    p.add_argument("--backend", default="local", help="local (a Pipeline here; default), grpc://HOST:PORT or http://HOST:PORT (a Triton fleet)")
    p.add_argument("--max-concurrency", type=int, default=4, help="requests running at once (default 4)")
    p.add_argument("--max-queue", type=int, default=64, help="requests waiting for a slot (default 64; more get 429)")
    p.add_argument("--api-key", default=os.environ.get("HIRED_API_KEY"),
                   help="require 'Authorization: Bearer KEY' (default: $HIRED_API_KEY; unset = no key)")  # fmt: skip
    p.add_argument("--model-name", help="the model id clients send (default: the bundle's model name)")
    p.add_argument("--allow-files", metavar="DIR", help="serve file:// image URLs from under DIR")
    p.add_argument("--allow-url-fetch", action="store_true", help="fetch http(s) image URLs (public hosts only)")
    p.add_argument("--allow-remote", action="store_true", help="allow a non-loopback --host")
    p.add_argument("--budget", type=float, help="HiRED budget of requests that send none (default: the bundle's)")
    p.add_argument("--alpha", type=float, help="HiRED alpha of requests that send none (default: the bundle's)")
    p.add_argument("--provider", default="cpu", help="local backend: cpu (default), cuda or tensorrt")
    p.add_argument("--threads", type=int, help="local backend: onnxruntime intra-op threads")
    p.add_argument("--max-body-mb", type=float, default=DEFAULT_MAX_BODY / MB, help="request body limit (default 32; over it: 413)")
    p.add_argument("--max-image-mb", type=float, default=DEFAULT_MAX_BYTES / MB, help="one image's limit (default 20)")
    p.add_argument("--fetch-timeout", type=float, default=DEFAULT_TIMEOUT_S, help="seconds for one http(s) image (default 10)")
    p.add_argument("--shutdown-grace", type=float, default=10.0, help="seconds in-flight requests get on SIGTERM (default 10)")
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    a = p.parse_args(argv)
    if not is_loopback(a.host) and not a.allow_remote:
        p.error(f"--host {a.host} is reachable from other machines; add --allow-remote (and --api-key) to mean it")
    try:
        RequestOptions(budget=a.budget, alpha=a.alpha).hired_config(HiredConfig())
    except HiredError as e:
        p.error(str(e))
    if a.max_concurrency < 1 or a.max_queue < 0:
        p.error("--max-concurrency must be >= 1 and --max-queue >= 0")
    if not a.backend == "local" and not a.backend.startswith(("grpc://", "http://")):
        p.error(f"--backend must be local, grpc://HOST:PORT or http://HOST:PORT, got {a.backend!r}")
    return a


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def main(argv: Sequence[str] | None = None) -> int:
    a = parse_args(argv)
    from serving.openai.backend import LocalBackend, RemoteBackend

    logging.basicConfig(level=a.log_level.upper(), format="%(asctime)s %(name)s %(levelname)s %(message)s")
    if a.backend == "local":
        def load():
            return LocalBackend.load(a.artifacts, provider=a.provider, threads=a.threads)
    else:
        def load():
            return RemoteBackend(a.backend, a.artifacts)

    settings = Settings(
        model_name=a.model_name,
        api_key=a.api_key or None,
        max_concurrency=a.max_concurrency,
        max_queue=a.max_queue,
        max_body=int(a.max_body_mb * MB),
        images=ImagePolicy(allow_files=allowed_files(a.allow_files), allow_url_fetch=a.allow_url_fetch,
                           max_bytes=int(a.max_image_mb * MB), timeout_s=a.fetch_timeout),  # fmt: skip
        shutdown_grace_s=a.shutdown_grace,
        hired_defaults={k: v for k, v in (("budget", a.budget), ("alpha", a.alpha)) if v is not None},
    )
    app = create_app(load, settings)
    config = uvicorn.Config(app, host=a.host, port=a.port, log_level=a.log_level, access_log=False,
                            timeout_graceful_shutdown=a.shutdown_grace, lifespan="on")  # fmt: skip
    server = _Server(config)
    server.run()
    return 0 if server.started else 1


class _Server(uvicorn.Server):
    """uvicorn.Server whose SIGTERM/SIGINT stop it gracefully and are not re-raised afterwards (so exit 0)."""

    def handle_exit(self, sig, frame) -> None:
        if self.should_exit and sig == signal.SIGINT:
            self.force_exit = True  # a second Ctrl+C: stop waiting for requests in flight
        else:
            self.should_exit = True


if __name__ == "__main__":
    sys.exit(main())
