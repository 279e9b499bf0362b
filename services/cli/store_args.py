"""The Redis flags every command that reads or writes shared state takes, and the store they name.

``--redis-url`` (else ``SCEPSY_REDIS_URL``, else ``REDIS_URL``, else the Redis that ``scepsy up``
started: ``services.cli.cluster.resolve_redis_url``) and
``--namespace`` (else ``SCEPSY_NAMESPACE``, else ``scepsy``).
"""

from __future__ import annotations

import argparse
import asyncio
import os
from collections.abc import Awaitable, Callable
from typing import TypeVar

from services.runtime.store import Store

T = TypeVar("T")


def add_store_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--redis-url",
        help="Redis (env SCEPSY_REDIS_URL, else REDIS_URL; default: the one `scepsy up` started)",
    )
    parser.add_argument(
        "--namespace",
        default=os.environ.get("SCEPSY_NAMESPACE", "scepsy"),
        help="Redis key namespace (env SCEPSY_NAMESPACE; default scepsy)",
    )


def connect_store(args: argparse.Namespace) -> Store:
    from services.cli.cluster import resolve_redis_url

    return Store.connect(resolve_redis_url(args.redis_url), namespace=args.namespace)


def with_store(args: argparse.Namespace, action: Callable[[Store], Awaitable[T]]) -> T:
    """Run ``action`` against the store the flags name, then close it."""

    async def run() -> T:
        store = connect_store(args)
        try:
            return await action(store)
        finally:
            await store.close()

    return asyncio.run(run())
