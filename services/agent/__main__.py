"""``python -m services.agent``: run one node agent until SIGTERM/SIGINT."""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Sequence

from services.agent.config import AgentConfig
from services.agent.service import Agent, agent_binding
from services.agent.sources import open_source
from services.core.errors import ScepsyError
from services.runtime.logging import configure_logging
from services.runtime.server import serve
from services.runtime.store import Store


async def run(config: AgentConfig) -> None:
    source = open_source(config.cluster, config.resolved_node_name)
    store = Store.connect(config.redis_url, config.redis_timeout_s)
    try:
        await serve(config, [agent_binding(Agent(config, source, store))])
    finally:
        await store.close()


def main(argv: Sequence[str] | None = None) -> int:
    try:
        config = AgentConfig.load(argv, prog="python -m services.agent")
        configure_logging(config.log_format, config.log_level)
        asyncio.run(run(config))
    except ScepsyError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
