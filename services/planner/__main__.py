"""``python -m services.planner``: run the planner until SIGTERM/SIGINT."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from services.planner.config import PlannerConfig
from services.planner.metrics import METRICS
from services.planner.service import Planner, planner_binding
from services.runtime.entry import run_service
from services.runtime.server import ServiceBinding
from services.runtime.store import Store


async def build(config: PlannerConfig, store: Store) -> Sequence[ServiceBinding]:
    binding = planner_binding(Planner(config, store))
    return [dataclasses.replace(binding, metrics=(*binding.metrics, METRICS.registry))]


def main(argv: Sequence[str] | None = None) -> int:
    return run_service(
        PlannerConfig, build, argv, prog="python -m services.planner", name="planner"
    )


if __name__ == "__main__":
    raise SystemExit(main())
