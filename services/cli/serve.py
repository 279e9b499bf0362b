"""``scepsy serve SERVICE [FLAGS]`` and ``scepsy health [ADDRESS]``: the one entry point of the
container images (``ENTRYPOINT ["scepsy"]``).

``serve`` runs one service in the foreground exactly as ``python -m services.<SERVICE>`` does: it
calls that module's ``main`` with the flags after the service name, so the flags, the
``SCEPSY_*`` environment, the Redis rule (``--redis-url`` or ``SCEPSY_REDIS_URL``, no state-file
fallback: a container has no suite) and the exit statuses (2 with ``error: field: ...`` for a bad
value) are the service's own. ``scepsy serve agent --help`` lists the agent's flags.

``health`` asks a gRPC server's ``grpc.health.v1.Health`` once, with a deadline, and exits 0 when
it answers SERVING, else 1 naming what it got (``NOT_SERVING`` while draining, ``UNAVAILABLE``,
``DEADLINE_EXCEEDED``). Without an address it checks the service of this container:
``127.0.0.1:$SCEPSY_PORT``. It is the compose file's health check; Kubernetes probes the same
service natively (``grpc:`` probes).
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import os
from typing import Any

from services.cli.suite import health
from services.core.errors import InvalidInputError
from services.runtime.config import env_name

SERVICES = ("agent", "profiler", "planner", "placer", "router")


def register(sub: Any) -> None:
    serve = sub.add_parser(
        "serve",
        help="run one service in the foreground (as python -m services.SERVICE)",
        description="Run one Scepsy service until SIGTERM/SIGINT. "
        "`scepsy serve SERVICE --help` lists that service's flags.",
    )
    serve.add_argument("service", choices=SERVICES, metavar="SERVICE", help=", ".join(SERVICES))
    serve.add_argument(
        "flags", nargs=argparse.REMAINDER, metavar="FLAGS", help="the service's own flags"
    )
    serve.set_defaults(func=cmd_serve)

    check = sub.add_parser(
        "health", help="exit 0 when a gRPC server answers its health check SERVING, else 1"
    )
    check.add_argument(
        "address",
        nargs="?",
        metavar="HOST:PORT",
        help=f"the server (default: 127.0.0.1:${env_name('port')})",
    )
    check.add_argument(
        "--timeout", type=float, default=2.0, help="deadline of the check in seconds (2)"
    )
    check.set_defaults(func=cmd_health)


def cmd_serve(args: argparse.Namespace) -> int:
    module = importlib.import_module(f"services.{args.service}.__main__")
    code: int = module.main(args.flags)
    return code


def cmd_health(args: argparse.Namespace) -> int:
    address = args.address or _own_address()
    if args.timeout <= 0:
        raise InvalidInputError(f"--timeout: must be > 0, got {args.timeout}")
    state = asyncio.run(health(address, args.timeout))
    if state == "SERVING":
        return 0
    print(f"{address}: {state}")
    return 1


def _own_address() -> str:
    port = os.environ.get(env_name("port"), "")
    if not port.isdigit() or int(port) == 0:
        raise InvalidInputError(
            f"address: not given and {env_name('port')} names no fixed port, got {port!r}"
        )
    return f"127.0.0.1:{port}"
