"""The profiler's own Prometheus figures, in a registry of its own (added to the server's, so
``GET /metrics`` of the profiler process shows them beside the RPC counters).

| metric | type | |
|---|---|---|
| scepsy_profiler_profiles_total | counter | profiles served, by ``source``: computed or stored |
| scepsy_profiler_compute_seconds | histogram | time of computing one profile, by ``backend`` |
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram

# Seconds; the analytic backend takes milliseconds, a measured one minutes.
COMPUTE_BUCKETS = (
    0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0, 3600.0,
)  # fmt: skip


class ProfilerMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.profiles = Counter(
            "scepsy_profiler_profiles",
            "Profiles served, by source: computed by a backend, or stored (read from Redis)",
            ["source"],
            registry=self.registry,
        )
        self.compute_seconds = Histogram(
            "scepsy_profiler_compute_seconds",
            "Time of computing one profile",
            ["backend"],
            buckets=COMPUTE_BUCKETS,
            registry=self.registry,
        )

    def computed(self, backend: str, seconds: float) -> None:
        self.profiles.labels("computed").inc()
        self.compute_seconds.labels(backend).observe(seconds)

    def stored(self) -> None:
        self.profiles.labels("stored").inc()
