"""``python -m services.planner``: run the planner until SIGTERM/SIGINT."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from services.planner.config import PlannerConfig
from services.planner.loop import ControlLoop
from services.planner.metrics import METRICS
from services.planner.service import Planner, planner_binding
from services.runtime.entry import run_service
from services.runtime.server import ServiceBinding
from services.runtime.store import Store


async def build(config: PlannerConfig, store: Store) -> Sequence[ServiceBinding]:
    planner = Planner(config, store)
    binding = planner_binding(planner)
    if config.loop:  # the control loop re-plans on drift (services/planner/loop.py)
        loop = ControlLoop(config, store, planner)
        binding = dataclasses.replace(
            binding,
            on_start=(*binding.on_start, loop.start),
            on_stop=(loop.stop, *binding.on_stop),
            metrics=(*binding.metrics, loop.metrics.registry),
        )
    return [dataclasses.replace(binding, metrics=(*binding.metrics, METRICS.registry))]


def main(argv: Sequence[str] | None = None) -> int:
    return run_service(
        PlannerConfig, build, argv, prog="python -m services.planner", name="planner"
    )


if __name__ == "__main__":
    raise SystemExit(main())
