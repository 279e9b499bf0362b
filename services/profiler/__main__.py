"""``python -m services.profiler``: run the profiler service until SIGTERM/SIGINT."""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Sequence

from services.core.errors import ScepsyError
from services.profiler.service import profiler_binding
from services.runtime.config import ServiceConfig
from services.runtime.logging import configure_logging
from services.runtime.server import serve
from services.runtime.store import Store


async def run(config: ServiceConfig) -> None:
    store = Store.connect(config.redis_url, config.redis_timeout_s)
    try:
        await serve(config, [profiler_binding(store)])
    finally:
        await store.close()


def main(argv: Sequence[str] | None = None) -> int:
    try:
        config = ServiceConfig.load(argv, prog="python -m services.profiler")
        configure_logging(config.log_format, config.log_level)
        asyncio.run(run(config))
    except ScepsyError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
