"""``python -m services.planner``: run the planner until SIGTERM/SIGINT."""

from __future__ import annotations

from collections.abc import Sequence

from services.planner.config import PlannerConfig
from services.planner.service import Planner, planner_binding
from services.runtime.entry import run_service
from services.runtime.server import ServiceBinding
from services.runtime.store import Store


async def build(config: PlannerConfig, store: Store) -> Sequence[ServiceBinding]:
    return [planner_binding(Planner(config, store))]


def main(argv: Sequence[str] | None = None) -> int:
    return run_service(PlannerConfig, build, argv, prog="python -m services.planner")


if __name__ == "__main__":
    raise SystemExit(main())
