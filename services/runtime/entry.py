"""The one ``main`` of every service process: load and validate the config, configure logging,
connect the Redis store, serve the bindings until SIGTERM/SIGINT, close the store.

A service's ``__main__`` is then a few lines::

    def main(argv=None) -> int:
        return run_service(AgentConfig, build_agent, argv, prog="python -m services.agent")

Configuration and domain errors (a bad flag value, a missing cluster file) print
``error: <message>`` and return 2 before anything starts.
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Awaitable, Callable, Sequence
from typing import TypeVar

from services.core.errors import ScepsyError
from services.runtime.config import ServiceConfig
from services.runtime.logging import configure_logging
from services.runtime.server import ServiceBinding, serve
from services.runtime.store import Store

C = TypeVar("C", bound=ServiceConfig)
Build = Callable[[C, Store], Awaitable[Sequence[ServiceBinding]]]


def run_service(
    config_cls: type[C], build: Build[C], argv: Sequence[str] | None = None, prog: str = ""
) -> int:
    try:
        config = config_cls.load(argv, prog=prog or None)
        configure_logging(config.log_format, config.log_level)
        asyncio.run(_run(config, build))
    except ScepsyError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


async def _run(config: C, build: Build[C]) -> None:
    store = Store.connect(config.redis_url, config.redis_timeout_s, config.namespace)
    try:
        await serve(config, await build(config, store))
    finally:
        await store.close()
