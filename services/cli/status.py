"""``scepsy status [--json]``: the suite's services, with a live health check each, the nodes and
the current plan.

The services are those announced in Redis (``Store.list_services``; every service process
announces itself, see ``services.runtime.registration``) together with those ``scepsy up``
recorded in the state file (so one that died is listed too, as not running). Each is checked
with a gRPC health check with a deadline (``--timeout``). The nodes are the agents' node records;
the plan is the current one (``Store.get_current_plan``). Redis is the one from ``--redis-url``,
``REDIS_URL`` or the state file; when it cannot be reached, the services of the state file are
still listed and checked.

``--json`` prints one object::

    {"redis": {"url", "namespace", "embedded", "reachable", "error"?},
     "services": [{"name", "role", "address", "metrics_address", "pid", "host", "health",
                   "healthy", "registered", "running", "log", "http_address"?, "node"?}],
     "nodes": [{"name", "gpus", "gpu_type", "agent_address", "heartbeat_age_s"}],
     "plan": {"id", "created_at", "gpus", "objective_s"} | null}

``running`` is whether the PID runs (None for a process on another host); ``registered``
whether its announcement is in Redis.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import socket
import time
from typing import Any

from services.cli.cluster import read_state, resolve_redis_url
from services.cli.suite import alive, health
from services.core.cluster.inventory import NodeInventory
from services.core.errors import InvalidInputError, UnavailableError
from services.core.planning.plan import Plan
from services.runtime.store import ServiceRecord, Store


def register(sub: Any) -> None:
    status = sub.add_parser("status", help="the suite's services and their health, nodes, plan")
    status.add_argument("--json", action="store_true", help="print one JSON object")
    status.add_argument("--redis-url", help="Redis (default: the one `scepsy up` started)")
    status.add_argument(
        "--namespace", help="Redis key namespace (default: the suite's, else scepsy)"
    )
    status.add_argument(
        "--timeout", type=float, default=1.0, help="deadline of each health check (seconds)"
    )
    status.set_defaults(func=cmd_status)


def cmd_status(args: argparse.Namespace) -> int:
    if args.timeout <= 0:
        raise InvalidInputError(f"--timeout: must be > 0, got {args.timeout}")
    state = read_state() or {}
    url = resolve_redis_url(args.redis_url)
    namespace = args.namespace or state.get("redis", {}).get("namespace") or "scepsy"
    doc = asyncio.run(gather(url, namespace, state, args.timeout))
    if not args.redis_url and "redis" in state and url == state["redis"]["url"]:
        doc["redis"]["embedded"] = bool(state["redis"].get("embedded"))
    if args.json:
        print(json.dumps(doc))
    else:
        print(format_status(doc))
    return 0


async def gather(
    url: str, namespace: str, state: dict[str, Any], timeout_s: float
) -> dict[str, Any]:
    """The status document (module docstring) of the suite in ``state`` and Redis at ``url``."""
    redis: dict[str, Any] = {"url": url, "namespace": namespace, "embedded": None}
    records: list[ServiceRecord] = []
    nodes: list[NodeInventory] = []
    plan: Plan | None = None
    store = Store.connect(url, timeout_s=timeout_s, namespace=namespace)
    try:
        records = await store.list_services()
        nodes = await store.list_nodes()
        plan = await store.get_current_plan()
        redis["reachable"] = True
    except UnavailableError as exc:
        redis["reachable"] = False
        redis["error"] = str(exc)
    finally:
        await store.close()
    services = _services(records, state.get("services", {}))
    states = await asyncio.gather(*(health(s["address"], timeout_s) for s in services))
    for service, checked in zip(services, states, strict=True):
        service["health"] = checked
        service["healthy"] = checked == "SERVING"
    now = time.time()
    return {
        "redis": redis,
        "services": services,
        "nodes": [_node(n, now) for n in nodes],
        "plan": None if plan is None else _plan(plan),
    }


def _services(records: list[ServiceRecord], recorded: dict[str, Any]) -> list[dict[str, Any]]:
    """The announced services and those of the state file, one entry per process."""
    host = socket.gethostname()
    out: dict[tuple[str, int], dict[str, Any]] = {}
    for r in records:
        name = f"{r.name}/{r.extra['node']}" if "node" in r.extra else r.name
        out[name, r.pid] = {
            "name": name,
            "role": r.name,
            "address": r.address,
            "metrics_address": r.metrics_address,
            "pid": r.pid,
            "host": r.host,
            "registered": True,
            "running": alive(r.pid) if r.host == host else None,
            "log": None,
            **r.extra,
        }
    for name, s in recorded.items():
        entry = out.get((name, s["pid"]))
        if entry is None:
            entry = out[name, s["pid"]] = {
                "name": name,
                "role": name.split("/")[0],
                "host": host,
                "registered": False,
                "running": alive(s["pid"]),
                **s,
            }
        entry["log"] = s.get("log")
    return sorted(out.values(), key=lambda s: (s["name"], s["pid"]))


def _node(node: NodeInventory, now: float) -> dict[str, Any]:
    return {
        "name": node.name,
        "gpus": len(node.gpus),
        "gpu_type": "/".join(sorted({g.gpu_type for g in node.gpus})),
        "agent_address": node.agent_address,
        "heartbeat_age_s": round(max(0.0, now - node.heartbeat_at), 3),
    }


def _plan(plan: Plan) -> dict[str, Any]:
    return {
        "id": plan.id,
        "created_at": plan.created_at,
        "gpus": plan.gpus,
        "objective_s": plan.objective_s,
    }


def format_status(doc: dict[str, Any]) -> str:
    redis = doc["redis"]
    where = " (embedded)" if redis.get("embedded") else ""
    reach = "" if redis["reachable"] else f"  UNREACHABLE: {redis['error']}"
    lines = [f"redis {redis['url']}{where}  namespace {redis['namespace']}{reach}", ""]
    rows: list[tuple[str, ...]] = [("SERVICE", "ADDRESS", "HTTP", "METRICS", "PID", "HEALTH")]
    for s in doc["services"]:
        pid = f"{s['pid']}" + ("" if s["running"] is not False else " (gone)")
        rows.append(
            (
                s["name"],
                s["address"],
                s.get("http_address", "-"),
                s["metrics_address"],
                pid,
                s["health"],
            )
        )
    lines += _table(rows)
    lines.append("")
    rows = [("NODE", "GPUS", "AGENT", "SEEN")]
    for n in doc["nodes"]:
        rows.append(
            (
                n["name"],
                f"{n['gpus']}x {n['gpu_type'] or '-'}",
                n["agent_address"] or "-",
                f"{n['heartbeat_age_s']:.1f}s ago",
            )
        )
    lines += _table(rows)
    lines.append("")
    plan = doc["plan"]
    if plan is None:
        lines.append("plan  none (run `scepsy plan --spec SPEC`)")
    else:
        lines.append(
            f"plan  {plan['id']}  {plan['gpus']:g} GPUs  latency {plan['objective_s']:.3f} s"
        )
    return "\n".join(lines)


def _table(rows: list[tuple[str, ...]]) -> list[str]:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]
