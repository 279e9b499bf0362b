"""The profiler's configuration (``python -m services.profiler --help``)."""

from __future__ import annotations

from dataclasses import dataclass

from services.runtime.config import ServiceConfig, in_range, option


@dataclass(frozen=True)
class ProfilerConfig(ServiceConfig):
    """Profiler: profiles (model, GPU, TP, fraction) under a request mix and stores them."""

    profile_workers: int = option(
        0,
        "worker processes for analytic profiles, so that concurrent Profile calls compute in "
        "parallel (0: one per CPU; 1: none, computed in a thread)",
        in_range(0, 256),
    )
