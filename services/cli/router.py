"""``scepsy router`` and ``scepsy endpoints``: run the router, register the engines it routes to.

``router [FLAGS]`` runs the router in the foreground (flags as ``python -m services.router
--help``; Redis by the CLI's one rule, ``services.cli.cluster.resolve_redis_url``: the flag,
``SCEPSY_REDIS_URL``, ``REDIS_URL``, the one ``scepsy up`` started, else an error).
``endpoints add MODEL URL`` registers an engine replica (its id defaults to the URL's host:port, so
adding the same URL twice replaces it), ``endpoints remove MODEL TARGET`` removes the replicas
whose URL or id is TARGET, and ``endpoints list`` shows them all. Running routers pick changes up
without a restart.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from typing import Any, TypeVar
from urllib.parse import urlsplit

from services.cli.cluster import resolve_redis_url
from services.cli.store_args import add_store_flags, with_store
from services.core.errors import InvalidInputError, NotFoundError
from services.core.routing import Endpoint
from services.router.config import RouterConfig
from services.runtime.config import env_name
from services.runtime.store import Store

T = TypeVar("T")
_ROUTER_FLAG = "router_flag_"


def register(sub: Any) -> None:
    router = sub.add_parser(
        "router", help="run the router (OpenAI-compatible HTTP + gRPC) in the foreground"
    )
    for f in dataclasses.fields(RouterConfig):
        router.add_argument(
            "--" + f.name.replace("_", "-"),
            dest=_ROUTER_FLAG + f.name,
            metavar=f.name.upper(),
            help=f"{f.metadata.get('help', '')} (env {env_name(f.name)}; default {f.default!r})",
        )
    router.set_defaults(func=cmd_router)

    endpoints = sub.add_parser("endpoints", help="register the engine replicas of each model")
    endpoints_sub = endpoints.add_subparsers(dest="endpoints_command", metavar="COMMAND")
    endpoints_sub.required = True

    add = endpoints_sub.add_parser("add", help="register an engine replica of a model")
    add.add_argument("model", metavar="MODEL")
    add.add_argument("url", metavar="URL", help="engine base URL, e.g. http://10.0.0.5:8000")
    add.add_argument("--replica", help="replica id (default: the URL's host:port)")
    add.add_argument("--weight", type=float, default=1.0, help="capacity, e.g. its GPU share")
    _store_flags(add)
    add.set_defaults(func=cmd_add)

    remove = endpoints_sub.add_parser("remove", help="deregister engine replicas of a model")
    remove.add_argument("model", metavar="MODEL")
    remove.add_argument("target", metavar="TARGET", help="the replica's URL or id")
    _store_flags(remove)
    remove.set_defaults(func=cmd_remove)

    listing = endpoints_sub.add_parser("list", help="list the registered replicas")
    _store_flags(listing)
    listing.set_defaults(func=cmd_list)


def _store_flags(parser: argparse.ArgumentParser) -> None:
    add_store_flags(parser)
    parser.add_argument("--json", action="store_true", help="print JSON")


def cmd_router(args: argparse.Namespace) -> int:
    from services.router.__main__ import main as router_main

    given = {
        name[len(_ROUTER_FLAG) :]: value
        for name, value in vars(args).items()
        if name.startswith(_ROUTER_FLAG) and value is not None
    }
    # never the router's own default: it may be somebody else's Redis
    given["redis_url"] = resolve_redis_url(given.get("redis_url"))
    flags = [item for name, value in given.items() for item in (_flag(name), value)]
    return router_main(flags, prog="scepsy router")


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _replica_id(url: str) -> str:
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise InvalidInputError(f"URL: must be http(s)://host:port, got {url!r}")
    return parts.netloc


def endpoint_json(endpoint: Endpoint) -> dict[str, Any]:
    return {
        "model": endpoint.model,
        "replica": endpoint.replica,
        "url": endpoint.url,
        "weight": endpoint.weight,
    }


def cmd_add(args: argparse.Namespace) -> int:
    url = args.url.rstrip("/")
    endpoint = Endpoint(args.model, args.replica or _replica_id(url), url, args.weight)
    with_store(args, lambda store: store.put_endpoint(endpoint))
    if args.json:
        print(json.dumps(endpoint_json(endpoint)))
    else:
        print(f"added {endpoint.model} replica {endpoint.replica} at {endpoint.url}")
    return 0


def cmd_remove(args: argparse.Namespace) -> int:
    target = args.target.rstrip("/")

    async def remove(store: Store) -> list[str]:
        matching = [
            e.replica
            for e in await store.list_endpoints()
            if e.model == args.model and target in (e.url, e.replica)
        ]
        for replica in matching:
            await store.remove_endpoint(args.model, replica)
        return matching

    removed = with_store(args, remove)
    if not removed:
        raise NotFoundError(f"model {args.model}: no replica with URL or id {target!r}")
    if args.json:
        print(json.dumps({"model": args.model, "removed": removed}))
    else:
        print(f"removed {args.model} replicas {', '.join(removed)}")
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    endpoints = with_store(args, lambda store: store.list_endpoints())
    if args.json:
        print(json.dumps({"endpoints": [endpoint_json(e) for e in endpoints]}))
        return 0
    if not endpoints:
        print("no endpoints registered")
        return 0
    rows = [("MODEL", "REPLICA", "URL", "WEIGHT")] + [
        (e.model, e.replica, e.url, f"{e.weight:g}") for e in endpoints
    ]
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    for row in rows:
        print("  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)).rstrip())
    return 0
