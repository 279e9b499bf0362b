"""``python -m services.agent``: run one node agent until SIGTERM/SIGINT."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from services.agent.config import AgentConfig
from services.agent.engines import engine_manager
from services.agent.service import Agent, agent_binding
from services.agent.sources import open_source
from services.runtime.entry import run_service
from services.runtime.server import ServiceBinding
from services.runtime.store import Store


async def build(config: AgentConfig, store: Store) -> Sequence[ServiceBinding]:
    source = open_source(config.cluster, config.resolved_node_name)
    engines = engine_manager(config, source.read(), store)
    binding = agent_binding(Agent(config, source, store, engines=engines))
    return [dataclasses.replace(binding, announce=lambda: {"node": config.resolved_node_name})]


def main(argv: Sequence[str] | None = None) -> int:
    return run_service(AgentConfig, build, argv, prog="python -m services.agent", name="agent")


if __name__ == "__main__":
    raise SystemExit(main())
