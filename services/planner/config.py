"""The planner's configuration."""

from __future__ import annotations

from dataclasses import dataclass

from services.runtime.config import ServiceConfig, in_range, option


@dataclass(frozen=True)
class PlannerConfig(ServiceConfig):
    """Planner: searches the allocation of a deployment spec, places it, stores it as a plan."""

    max_rounds: int = option(
        64, "placement feedback: searches before giving up on a placeable plan", in_range(1, 10_000)
    )
    profile_caches: int = option(
        8, "deployment specs whose profiles stay cached in memory", in_range(1, 1_000)
    )
