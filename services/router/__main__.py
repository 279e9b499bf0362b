"""``python -m services.router``: run the router (HTTP and gRPC) until SIGTERM/SIGINT, on
uvloop's event loop (the router's CPU per call: ``scripts/bench_router.py``).

Once built, the objects made so far (modules, classes, the configuration: nearly all of the
process's objects, kept for its lifetime) are moved out of the garbage collector's reach
(``gc.freeze``): the collector's full passes, which calls trigger, then traverse only what
calls made instead of every object imported.
"""

from __future__ import annotations

import asyncio
import dataclasses
import gc
from collections.abc import Sequence

import uvloop

from services.router.config import RouterConfig
from services.router.service import Router, router_binding
from services.runtime.entry import run_service
from services.runtime.server import ServiceBinding
from services.runtime.store import Store


async def build(config: RouterConfig, store: Store) -> Sequence[ServiceBinding]:
    router = Router(config, store)

    def http_address() -> dict[str, str]:  # read once started: the HTTP port (0 picks one) is bound
        return {"http_address": f"{config.resolved_http_host}:{router.http_port}"}

    bindings = [dataclasses.replace(router_binding(router), announce=http_address)]
    gc.collect()
    gc.freeze()
    return bindings


def main(argv: Sequence[str] | None = None, prog: str = "python -m services.router") -> int:
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    return run_service(RouterConfig, build, argv, prog=prog, name="router")


if __name__ == "__main__":
    raise SystemExit(main())
