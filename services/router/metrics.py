"""The router's Prometheus metrics, in a registry of its own (several routers may share a process,
as in tests). ``render`` gives the text exposition served on ``GET /metrics``.

The figures every call updates (calls by outcome, latency, time to first token) are
``LoopCounter`` and ``LoopHistogram``: plain numbers updated on the event loop, without the lock,
label look-up and checks that prometheus_client does per update (a large part of the router's
own cost per call); their exposition is that of prometheus_client's ``Counter`` and
``Histogram``. The in-flight gauge per replica is read from the replicas when scraped
(``in_flight_source``), not set twice per call.
"""

from __future__ import annotations

import contextlib
import math
import time
from bisect import bisect_left
from collections.abc import Callable, Iterable, Sequence
from typing import Any, ClassVar

from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest
from prometheus_client import metrics as _prometheus_metrics
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.metrics_core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.samples import Sample
from prometheus_client.utils import floatToGoString

CONTENT_TYPE = CONTENT_TYPE_LATEST

# Seconds; from sub-millisecond (the router's own cost) to long generations.
LATENCY_BUCKETS = (
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
    120.0, 300.0,
)  # fmt: skip


def _created_series() -> bool:
    """Whether ``_created`` samples are exposed (prometheus_client's
    ``PROMETHEUS_DISABLE_CREATED_SERIES``), as for its own metrics."""
    return bool(getattr(_prometheus_metrics, "_use_created", True))


class _Collector:
    """What the router's own collectors share: name, help text, label names, and the metric
    family they expose (``describe``; ``collect`` fills a fresh one)."""

    family: ClassVar[type[CounterMetricFamily | HistogramMetricFamily | GaugeMetricFamily]]

    def __init__(self, name: str, documentation: str, labelnames: Sequence[str]) -> None:
        self.name = name
        self.documentation = documentation
        self.labelnames = tuple(labelnames)

    def _family(self) -> Any:
        return self.family(self.name, self.documentation, labels=self.labelnames)

    def describe(self) -> list[Metric]:
        return [self._family()]


class LoopCounter(_Collector):
    """A labelled counter updated only on the event loop: ``inc(labels)`` adds to a float."""

    family = CounterMetricFamily

    def __init__(
        self, name: str, documentation: str, labelnames: Sequence[str], registry: CollectorRegistry
    ) -> None:
        super().__init__(name, documentation, labelnames)
        self._values: dict[tuple[str, ...], float] = {}
        self._created: dict[tuple[str, ...], float] = {}
        registry.register(self)

    def inc(self, labels: tuple[str, ...], amount: float = 1.0) -> None:
        values = self._values
        if labels in values:
            values[labels] += amount
        else:
            values[labels] = amount
            self._created[labels] = time.time()

    def value(self, *labels: str) -> float:
        return self._values.get(labels, 0.0)

    def collect(self) -> list[Metric]:
        family = self._family()
        created = self._created if _created_series() else {}
        for labels, value in list(self._values.items()):
            family.add_metric(labels, value, created=created.get(labels))
        return [family]


class LoopHistogram(_Collector):
    """A labelled histogram updated only on the event loop: ``observe(labels, value)`` counts
    ``value`` in its bucket (a binary search) and adds it to the sum."""

    family = HistogramMetricFamily

    def __init__(
        self,
        name: str,
        documentation: str,
        labelnames: Sequence[str],
        buckets: Sequence[float],
        registry: CollectorRegistry,
    ) -> None:
        super().__init__(name, documentation, labelnames)
        self._bounds = tuple(float(b) for b in buckets if not math.isinf(b))
        self._le = [floatToGoString(b) for b in self._bounds] + ["+Inf"]  # type: ignore[no-untyped-call]
        # per label values: the count of each bucket (not cumulative), then the sum
        self._series: dict[tuple[str, ...], list[float]] = {}
        self._created: dict[tuple[str, ...], float] = {}
        registry.register(self)

    def observe(self, labels: tuple[str, ...], value: float) -> None:
        series = self._series.get(labels)
        if series is None:
            series = self._series[labels] = [0.0] * (len(self._bounds) + 2)
            self._created[labels] = time.time()
        series[bisect_left(self._bounds, value)] += 1.0  # the first bound >= value: "le"
        series[-1] += value

    def count(self, *labels: str) -> float:
        series = self._series.get(labels)
        return sum(series[:-1]) if series is not None else 0.0

    def collect(self) -> list[Metric]:
        family = self._family()
        use_created = _created_series()
        for labels, series in list(self._series.items()):
            counts = list(series)
            cumulative, total = [], 0.0
            for le, count in zip(self._le, counts[:-1], strict=True):
                total += count
                cumulative.append((le, total))
            family.add_metric(labels, cumulative, sum_value=counts[-1])
            if use_created:
                named = dict(zip(self.labelnames, labels, strict=True))
                family.samples.append(Sample(self.name + "_created", named, self._created[labels]))
        return [family]


class ReadGauge(_Collector):
    """A labelled gauge read from its source when scraped (``source`` yields (labels, value))."""

    family = GaugeMetricFamily

    def __init__(
        self, name: str, documentation: str, labelnames: Sequence[str], registry: CollectorRegistry
    ) -> None:
        super().__init__(name, documentation, labelnames)
        self.source: Callable[[], Iterable[tuple[tuple[str, ...], float]]] = lambda: ()
        registry.register(self)

    def collect(self) -> list[Metric]:
        family = self._family()
        for labels, value in list(self.source()):
            family.add_metric(labels, value)
        return [family]


class RouterMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = LoopCounter(
            "scepsy_router_requests",
            "Calls finished, by model, front end and outcome (ok, error, cancelled, rejected)",
            ["model", "api", "status"],
            r,
        )
        self.errors = Counter(
            "scepsy_router_errors",
            "Failures by model and kind (connect, status, timeout, broken, overloaded, ...)",
            ["model", "kind"],
            registry=r,
        )
        self.latency = LoopHistogram(
            "scepsy_router_request_seconds",
            "End-to-end call latency through the router",
            ["model"],
            LATENCY_BUCKETS,
            r,
        )
        self.ttft = LoopHistogram(
            "scepsy_router_ttft_seconds",
            "Time to first token of streamed calls",
            ["model"],
            LATENCY_BUCKETS,
            r,
        )
        # read from the registry's replicas when scraped (``ReplicaRegistry`` sets the source)
        self.in_flight = ReadGauge(
            "scepsy_router_in_flight", "Calls in flight per replica", ["model", "replica"], r
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
        for metric in (self.replica_healthy, self.replica_failures):
            self._children.pop((metric, (model, replica)), None)
            with contextlib.suppress(KeyError):
                metric.remove(model, replica)
