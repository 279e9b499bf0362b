"""``python -m services.router``: run the router (HTTP and gRPC) until SIGTERM/SIGINT."""

from __future__ import annotations

from collections.abc import Sequence

from services.router.config import RouterConfig
from services.router.service import Router, router_binding
from services.runtime.entry import run_service
from services.runtime.server import ServiceBinding
from services.runtime.store import Store


async def build(config: RouterConfig, store: Store) -> Sequence[ServiceBinding]:
    return [router_binding(Router(config, store))]


def main(argv: Sequence[str] | None = None, prog: str = "python -m services.router") -> int:
    return run_service(RouterConfig, build, argv, prog=prog)


if __name__ == "__main__":
    raise SystemExit(main())
