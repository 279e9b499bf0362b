"""The placer's own Prometheus figures, in a registry of its own (added to the server's, so
``GET /metrics`` of the placer process shows them beside the RPC counters).

| metric | type | |
|---|---|---|
| scepsy_placer_placements_total | counter | allocations placed |
| scepsy_placer_instances_total | counter | instances started, stopped or moved (``change``) |
| scepsy_placer_place_seconds | histogram | time of one placement |
| scepsy_placer_partly_used_gpus | gauge | GPUs partly used after the last placement |
| scepsy_placer_stranded_gpus | gauge | free capacity on partly used GPUs after it, in GPUs |
| scepsy_placer_free_gpus | gauge | wholly free GPUs after it |
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from services.core.placement.heuristic import Replacement

# Seconds; a placement takes milliseconds on a few nodes, under a second on a thousand.
PLACE_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class PlacerMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.placements = Counter("scepsy_placer_placements", "Allocations placed", registry=r)
        self.instances = Counter(
            "scepsy_placer_instances",
            "Instances the placements changed: started, stopped or moved to other GPUs",
            ["change"],
            registry=r,
        )
        self.seconds = Histogram(
            "scepsy_placer_place_seconds",
            "Time of one placement",
            buckets=PLACE_BUCKETS,
            registry=r,
        )
        self.partly_used_gpus = Gauge(
            "scepsy_placer_partly_used_gpus",
            "GPUs with some but not all of their capacity used, after the last placement",
            registry=r,
        )
        self.stranded_gpus = Gauge(
            "scepsy_placer_stranded_gpus",
            "Free capacity on partly used GPUs after the last placement, in GPUs (stranded "
            "fraction)",
            registry=r,
        )
        self.free_gpus = Gauge(
            "scepsy_placer_free_gpus", "Wholly free GPUs after the last placement", registry=r
        )

    def record(self, result: Replacement, seconds: float) -> None:
        """One placement made: ``result`` and how long it took."""
        self.placements.inc()
        self.instances.labels("started").inc(len(result.started))
        self.instances.labels("stopped").inc(len(result.stopped))
        self.instances.labels("moved").inc(len(result.moved))
        self.seconds.observe(seconds)
        frag = result.placement.fragmentation
        self.partly_used_gpus.set(frag.partly_used_gpus)
        self.stranded_gpus.set(frag.stranded_fraction)
        self.free_gpus.set(frag.free_gpus)
