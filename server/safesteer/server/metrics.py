"""Prometheus metrics: one registry per app, recorded by middleware, serving and admin.

Gauges that describe live state (queue depth, batch rows, the active adapter of each family)
are read from the registry at scrape time rather than updated on every change.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily, InfoMetricFamily
from prometheus_client.registry import Collector
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from safesteer.server.registry import ModelRegistry

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)


class _LiveState(Collector):
    def __init__(self, registry: ModelRegistry) -> None:
        self.registry = registry

    def collect(self) -> Iterator[GaugeMetricFamily | InfoMetricFamily]:
        queue = GaugeMetricFamily(
            "safesteer_queue_depth", "Requests waiting for a batch slot.", labels=["model"]
        )
        rows = GaugeMetricFamily(
            "safesteer_batch_rows", "Rows decoding in the running batch.", labels=["model"]
        )
        for model in self.registry.models:
            queue.add_metric([model.name], model.engine.queue_depth)
            rows.add_metric([model.name], model.engine.active_rows)
        active = InfoMetricFamily(
            "safesteer_active_adapter", "The active safety adapter of each family."
        )
        for family in self.registry.families:
            record = family.active
            active.add_metric(
                [],
                {
                    "family": family.family.id,
                    "adapter": record.id if record else "none",
                    "sha256": record.file_sha256 if record else "",
                },
            )
        yield queue
        yield rows
        yield active


class ServerMetrics:
    """Every metric the server exports."""

    def __init__(self, registry: ModelRegistry) -> None:
        self.registry = CollectorRegistry()
        self.http_requests = Counter(
            "safesteer_http_requests",
            "HTTP requests by route, method and status.",
            ["route", "method", "status"],
            registry=self.registry,
        )
        self.http_latency = Histogram(
            "safesteer_http_request_duration_seconds",
            "Time from request to the last byte of the response.",
            ["route"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.prompt_tokens = Counter(
            "safesteer_prompt_tokens", "Prompt tokens admitted.", ["model"], registry=self.registry
        )
        self.completion_tokens = Counter(
            "safesteer_completion_tokens",
            "Completion tokens generated.",
            ["model"],
            registry=self.registry,
        )
        self.time_to_first_token = Histogram(
            "safesteer_time_to_first_token_seconds",
            "Time from admission to the first streamed token.",
            ["model"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.category_applied = Counter(
            "safesteer_category_applied",
            "Requests in `always` mode steered with each category (weight above zero).",
            ["family", "category"],
            registry=self.registry,
        )
        self.gate_fired = Counter(
            "safesteer_gate_fired",
            "Requests in `gated` mode on whose prompt each category's probe fired.",
            ["family", "category"],
            registry=self.registry,
        )
        self.adapter_swaps = Counter(
            "safesteer_adapter_swaps",
            "Activations of another adapter.",
            ["family"],
            registry=self.registry,
        )
        self.registry.register(_LiveState(registry))


class MetricsMiddleware:
    """Count requests and time them to the end of the response body (streams included)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        metrics: ServerMetrics | None = getattr(scope["app"].state, "metrics", None)
        if scope["type"] != "http" or metrics is None:
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = 500

        async def timed_send(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, timed_send)
        finally:
            route = scope.get("route")
            path = getattr(route, "path", None) or "unmatched"
            metrics.http_requests.labels(path, scope["method"], str(status)).inc()
            metrics.http_latency.labels(path).observe(time.perf_counter() - start)
