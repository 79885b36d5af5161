"""Prometheus metrics of the OpenAI front door (prometheus_client, one registry per app).

    hired_openai_requests_total{status="ok|error"}     completed chat requests
    hired_openai_errors_total{type}                    errors answered, by OpenAI error type
    hired_openai_ttft_seconds                          arrival -> first text piece
    hired_openai_request_seconds                       arrival -> last piece
    hired_openai_completion_tokens / _prompt_tokens    tokens per request (histograms)
    hired_openai_running / hired_openai_waiting        requests on the backend / queued
"""

from __future__ import annotations

import time

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

_TOKENS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192)
_SECONDS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)


class Metrics:
    def __init__(self):
        r = self.registry = CollectorRegistry()
        self.requests = Counter("hired_openai_requests", "Chat completion requests answered", ["status"], registry=r)
        self.errors = Counter("hired_openai_errors", "Errors answered, by OpenAI error type", ["type"], registry=r)
        self.ttft = Histogram("hired_openai_ttft_seconds", "Request arrival to first text piece", buckets=_SECONDS,
                              registry=r)  # fmt: skip
        self.latency = Histogram("hired_openai_request_seconds", "Request arrival to last text piece",
                                 buckets=_SECONDS, registry=r)  # fmt: skip
        self.completion_tokens = Histogram("hired_openai_completion_tokens", "Generated tokens per request",
                                           buckets=_TOKENS, registry=r)  # fmt: skip
        self.prompt_tokens = Histogram("hired_openai_prompt_tokens", "Prompt tokens (visual included) per request",
                                       buckets=_TOKENS, registry=r)  # fmt: skip
        self.running = Gauge("hired_openai_running", "Requests running on the backend", registry=r)
        self.waiting = Gauge("hired_openai_waiting", "Requests waiting for a slot", registry=r)

    def done(self, job, t0: float) -> None:
        """A request answered; t0: its arrival (perf_counter)."""
        self.requests.labels("ok").inc()
        if job.t_first is not None:
            self.ttft.observe(job.t_first - t0)
        self.latency.observe(time.perf_counter() - t0)
        usage = job.usage()
        self.completion_tokens.observe(usage["completion_tokens"])
        self.prompt_tokens.observe(usage["prompt_tokens"])

    def error(self, kind: str) -> None:
        self.requests.labels("error").inc()
        self.errors.labels(kind).inc()

    def set_load(self, running: int, waiting: int) -> None:
        self.running.set(running)
        self.waiting.set(waiting)

    def render(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
