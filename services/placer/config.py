"""The placer's configuration."""

from __future__ import annotations

from dataclasses import dataclass

from services.core.placement.heuristic import DEFAULT_MEMORY_MARGIN, DEFAULT_SPREAD_WINDOW
from services.runtime.config import ServiceConfig, in_range, option


@dataclass(frozen=True)
class PlacerConfig(ServiceConfig):
    """Placer: maps an allocation onto the cluster's nodes and GPUs (NVLink-aware, packed)."""

    cluster: str = option(
        "", "declared cluster YAML used when a request names no nodes (default: live nodes)"
    )
    memory_margin: float = option(
        DEFAULT_MEMORY_MARGIN,
        "share of every GPU's memory left to CUDA contexts and the driver",
        in_range(0.0, 0.5),
    )
    spread_window: int = option(
        DEFAULT_SPREAD_WINDOW,
        "equally good candidates compared when spreading replicas over nodes",
        in_range(1, 1024),
    )
