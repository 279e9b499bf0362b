"""The router's Prometheus metrics, in a registry of its own (several routers may share a process,
as in tests). ``render`` gives the text exposition served on ``GET /metrics``."""

from __future__ import annotations

import contextlib
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

CONTENT_TYPE = CONTENT_TYPE_LATEST

# Seconds; from sub-millisecond (the router's own cost) to long generations.
LATENCY_BUCKETS = (
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
    120.0, 300.0,
)  # fmt: skip


class RouterMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "scepsy_router_requests",
            "Calls finished, by model, front end and outcome (ok, error, cancelled, rejected)",
            ["model", "api", "status"],
            registry=r,
        )
        self.errors = Counter(
            "scepsy_router_errors",
            "Failures by model and kind (connect, status, timeout, broken, overloaded, ...)",
            ["model", "kind"],
            registry=r,
        )
        self.latency = Histogram(
            "scepsy_router_request_seconds",
            "End-to-end call latency through the router",
            ["model"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.ttft = Histogram(
            "scepsy_router_ttft_seconds",
            "Time to first token of streamed calls",
            ["model"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.in_flight = Gauge(
            "scepsy_router_in_flight",
            "Calls in flight per replica",
            ["model", "replica"],
            registry=r,
        )
        self.queue_length = Gauge(
            "scepsy_router_queue_length", "Calls waiting for a free replica", ["model"], registry=r
        )
        self.replica_healthy = Gauge(
            "scepsy_router_replica_healthy",
            "1 while a replica is admitted, 0 while ejected",
            ["model", "replica"],
            registry=r,
        )
        self.replica_failures = Counter(
            "scepsy_router_replica_failures",
            "Failed calls and health checks per replica",
            ["model", "replica"],
            registry=r,
        )
        self.retries = Counter(
            "scepsy_router_retries", "Calls retried on another replica", ["model"], registry=r
        )
        self.trace_recorded = Counter(
            "scepsy_router_trace_recorded", "Trace records written to Redis", registry=r
        )
        self.trace_dropped = Counter(
            "scepsy_router_trace_dropped",
            "Trace records that could not be written (Redis down or buffer full)",
            registry=r,
        )
        self.trace_lost = Counter(
            "scepsy_router_trace_lost",
            "Trace records that were written but vanished from Redis (restarted without its data)",
            registry=r,
        )
        self.endpoint_restores = Counter(
            "scepsy_router_endpoint_restores",
            "Times the store had lost the endpoint table and this router wrote back the replicas "
            "it knew",
            registry=r,
        )
        self.aborted = Counter(
            "scepsy_router_aborted",
            "In-flight calls ended by the router, by model and reason (replica ejected, idle "
            "stream)",
            ["model", "reason"],
            registry=r,
        )
        self.unauthenticated = Counter(
            "scepsy_router_unauthenticated", "Calls refused for a missing or wrong API key",
            registry=r,
        )  # fmt: skip

        # Label children by label values: ``labels()`` converts and looks up its values under
        # a lock on every use, a large part of the router's own cost per call.
        self._children: dict[tuple[object, tuple[str, ...]], Any] = {}

    def child(self, metric: Any, *values: str) -> Any:
        """``metric.labels(*values)``, looked up once."""
        key = (metric, values)
        found = self._children.get(key)
        if found is None:
            found = self._children[key] = metric.labels(*values)
        return found

    def render(self) -> bytes:
        return generate_latest(self.registry)

    def forget_replica(self, model: str, replica: str) -> None:
        """Drop the per-replica series of a deregistered replica."""
        for metric in (self.in_flight, self.replica_healthy, self.replica_failures):
            self._children.pop((metric, (model, replica)), None)
            with contextlib.suppress(KeyError):
                metric.remove(model, replica)
