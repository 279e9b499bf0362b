"""The router's event-loop metrics expose what prometheus_client's own would, line for line
(the ``_created`` timestamps aside)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from services.router.metrics import LoopCounter, LoopHistogram, ReadGauge

BUCKETS = (0.05, 0.1, 0.5, 1.0, float("inf"))


def exposition(registry: CollectorRegistry) -> list[str]:
    text = generate_latest(registry).decode()
    return [line for line in text.splitlines() if "_created" not in line]


def test_loop_metrics_expose_what_prometheus_client_would() -> None:
    ours, theirs = CollectorRegistry(), CollectorRegistry()
    counter = LoopCounter("calls", "Calls by outcome", ["model", "status"], ours)
    histogram = LoopHistogram("latency_seconds", "Latency", ["model"], BUCKETS, ours)
    gauge = ReadGauge("in_flight", "Calls in flight", ["model"], ours)
    gauge.source = lambda: [(("a",), 3.0), (("b",), 0.0)]
    reference_counter = Counter("calls", "Calls by outcome", ["model", "status"], registry=theirs)
    reference_histogram = Histogram(
        "latency_seconds", "Latency", ["model"], buckets=BUCKETS, registry=theirs
    )
    reference_gauge = Gauge("in_flight", "Calls in flight", ["model"], registry=theirs)
    reference_gauge.labels("a").set(3.0)
    reference_gauge.labels("b").set(0.0)
    for model, status, seconds in [("a", "ok", 0.04), ("a", "ok", 0.1), ("b", "error", 2.0)]:
        counter.inc((model, status))
        reference_counter.labels(model, status).inc()
        histogram.observe((model,), seconds)
        reference_histogram.labels(model).observe(seconds)
    assert exposition(ours) == exposition(theirs)
    assert counter.value("a", "ok") == 2.0 and histogram.count("a") == 2.0
