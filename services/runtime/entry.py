"""The one ``main`` of every service process: load and validate the config, configure logging,
connect the Redis store, serve the bindings until SIGTERM/SIGINT (announced in Redis under
``name``, see ``services.runtime.registration``), close the store.

A service's ``__main__`` is then a few lines::

    def main(argv=None) -> int:
        return run_service(
            AgentConfig, build_agent, argv, prog="python -m services.agent", name="agent"
        )

The Redis URL must be given (``--redis-url`` or ``SCEPSY_REDIS_URL``; ``scepsy up`` gives each
service the Redis it started). Configuration and domain errors (a bad flag value, no Redis URL, a
missing cluster file) print
``error: <message>`` and return 2 before anything starts.
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Awaitable, Callable, Sequence
from typing import TypeVar

from services.core.errors import ScepsyError
from services.runtime import channels
from services.runtime.config import ServiceConfig
from services.runtime.logging import configure_logging
from services.runtime.registration import Registration
from services.runtime.server import ServiceBinding, serve
from services.runtime.store import Store

C = TypeVar("C", bound=ServiceConfig)
Build = Callable[[C, Store], Awaitable[Sequence[ServiceBinding]]]


def run_service(
    config_cls: type[C],
    build: Build[C],
    argv: Sequence[str] | None = None,
    prog: str = "",
    name: str = "",
) -> int:
    """Run one service process; ``name`` (e.g. "placer") is what it registers as, and ``prog``
    defaults to ``python -m services.<name>``."""
    try:
        config = config_cls.load(
            argv,
            prog=prog or (f"python -m services.{name}" if name else None),
            required=("redis_url",),  # never a default Redis that may be somebody else's
        )
        configure_logging(config.log_format, config.log_level)
        channels.use(channels.Tls.of(config))  # the service's clients use its TLS files
        asyncio.run(_run(config, build, name))
    except ScepsyError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


async def _run(config: C, build: Build[C], name: str) -> None:
    store = Store.connect(
        config.redis_url, config.redis_timeout_s, config.namespace, config.redis_password()
    )
    try:
        registration = Registration(store, name, config) if name else None
        await serve(config, await build(config, store), registration=registration)
    finally:
        await store.close()
