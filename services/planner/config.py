"""The planner's configuration."""

from __future__ import annotations

from dataclasses import dataclass

from services.core.planning.feedback import DEFAULT_MAX_ROUNDS
from services.runtime.config import ServiceConfig, in_range, option, positive


@dataclass(frozen=True)
class PlannerConfig(ServiceConfig):
    """Planner: searches the allocation of a deployment spec, places it, stores it as a plan."""

    max_rounds: int = option(
        DEFAULT_MAX_ROUNDS,
        "placement feedback: searches before giving up on a placeable plan",
        in_range(1, 10_000),
    )
    profiler_address: str = option(
        "", "host:port of the Profiler service (empty: profiles computed in-process, store first)"
    )
    placer_address: str = option("", "host:port of the Placer service (empty: placed in-process)")
    trace_window_s: float = option(
        3600.0,
        "a spec's `trace: router` takes the router's calls of this many last seconds",
        positive,
    )
    rpc_timeout_s: float = option(
        30.0, "deadline of each call to the Profiler and Placer services", positive
    )
