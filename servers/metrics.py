"""Prometheus metrics, one registry per app (so several apps in one process, as in tests, do not collide)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

_LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 20, 60, 120, 300)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "steerlib_requests", "HTTP requests by endpoint and status", ["endpoint", "status"], registry=r
        )
        self.latency = Histogram(
            "steerlib_request_seconds",
            "Request latency by endpoint",
            ["endpoint"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.prompt_tokens = Counter("steerlib_prompt_tokens", "Prompt tokens of served requests", registry=r)
        self.completion_tokens = Counter("steerlib_completion_tokens", "Generated tokens", registry=r)
        self.steered = Counter("steerlib_steered_requests", "Requests that ran with steering", registry=r)
        self.rejected = Counter("steerlib_rejected", "Requests refused before running", ["reason"], registry=r)
        self.queue_depth = Gauge("steerlib_queue_depth", "Requests waiting for a batch", registry=r)
        self.batch_size = Histogram(
            "steerlib_batch_size", "Requests per batch", buckets=(1, 2, 4, 8, 16, 32, 64), registry=r
        )
        self.decode_steps = Counter("steerlib_decode_steps", "Forward passes run by the engine", registry=r)

    def render(self) -> bytes:
        return generate_latest(self.registry)
