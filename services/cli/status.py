"""``scepsy status [--json]``: the suite's services, with a live health check each, the nodes and
the current plan.

The services are those announced in Redis (``Store.list_services``; every service process
announces itself, see ``services.runtime.registration``) together with those ``scepsy up``
recorded in the state file (so one that died is listed too, as not running). Each is checked
with a gRPC health check with a deadline (``--timeout``). The nodes are the agents' node records;
the plan is the current one, asked of the Planner service (``GetPlan``) when the suite has one,
else (or when it does not answer) read from Redis, with the ``--recent`` most recent plans. Redis
is the one from ``--redis-url``, ``SCEPSY_REDIS_URL``, ``REDIS_URL`` or the state file (its
password shown as ``***``); when it cannot be reached, the
services of the state file are still listed and checked.

``--json`` prints one object::

    {"redis": {"url", "namespace", "embedded", "reachable", "error"?},
     "services": [{"name", "role", "address", "metrics_address", "pid", "host", "health",
                   "healthy", "registered", "running", "log", "http_address"?, "node"?}],
     "nodes": [{"name", "gpus", "gpu_type", "agent_address", "heartbeat_age_s"}],
     "plan": the current plan (as ``scepsy plan --json`` prints it) | null,
     "plan_from": "planner at HOST:PORT" | "redis",
     "plans": [{"id", "created_at", "gpus", "objective_s", "workflows"}],
     "loop": {"control", "status", "last_decision"} as ``scepsy loop status --json`` | null}

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

import grpc

from protos.scepsy.v1 import planner_pb2, planner_pb2_grpc
from services.cli.apply import engine_dict
from services.cli.cluster import given_redis_url, read_state, resolve_redis_url
from services.cli.loop import loop_summary, summary_line
from services.cli.plan import format_plan
from services.cli.suite import alive, health
from services.core.cluster.inventory import NodeInventory
from services.core.errors import InvalidInputError, UnavailableError
from services.core.planning.plan import Plan, plan_dict
from services.runtime import channels
from services.runtime.convert import plan_from_pb
from services.runtime.errors import error_from_rpc
from services.runtime.redis_url import redact
from services.runtime.store import ServiceRecord, Store


def register(sub: Any) -> None:
    status = sub.add_parser("status", help="the suite's services and their health, nodes, plan")
    status.add_argument("--json", action="store_true", help="print one JSON object")
    status.add_argument(
        "--redis-url",
        help="Redis (env SCEPSY_REDIS_URL, else REDIS_URL; default: the one `scepsy up` started)",
    )
    status.add_argument(
        "--namespace", help="Redis key namespace (default: the suite's, else scepsy)"
    )
    status.add_argument(
        "--timeout", type=float, default=1.0, help="deadline of each health check (seconds)"
    )
    status.add_argument("--recent", type=int, default=5, help="recent plans to list (default 5)")
    status.set_defaults(func=cmd_status)


def cmd_status(args: argparse.Namespace) -> int:
    if args.timeout <= 0:
        raise InvalidInputError(f"--timeout: must be > 0, got {args.timeout}")
    if args.recent < 0:
        raise InvalidInputError(f"--recent: must be >= 0, got {args.recent}")
    state = read_state() or {}
    url = resolve_redis_url(args.redis_url)
    namespace = args.namespace or state.get("redis", {}).get("namespace") or "scepsy"
    doc, current = asyncio.run(gather(url, namespace, state, args.timeout, args.recent))
    if given_redis_url(args.redis_url) is None and "redis" in state:
        doc["redis"]["embedded"] = bool(state["redis"].get("embedded"))
    if args.json:
        print(json.dumps(doc))
    else:
        print(format_status(doc, current))
    return 0


async def gather(
    url: str, namespace: str, state: dict[str, Any], timeout_s: float, recent: int = 5
) -> tuple[dict[str, Any], Plan | None]:
    """The status document (module docstring) of the suite in ``state`` and Redis at ``url``,
    and the current plan."""
    redis: dict[str, Any] = {"url": redact(url), "namespace": namespace, "embedded": None}
    records: list[ServiceRecord] = []
    nodes: list[NodeInventory] = []
    plan: Plan | None = None
    plans: list[Plan] = []
    loop: dict[str, Any] | None = None  # the control loop (`scepsy loop status`)
    engines: list[Any] = []
    planner = state.get("services", {}).get("planner", {}).get("address")
    plan_from = f"planner at {planner}" if planner else "redis"
    store = Store.connect(url, timeout_s=timeout_s, namespace=namespace)
    try:
        records = await store.list_services()
        nodes = await store.list_nodes()
        engines = await store.list_engines()
        if planner:
            try:
                plan = await current_plan(planner, timeout_s)
            except UnavailableError as exc:
                plan_from = f"redis ({exc})"
                planner = None
        if not planner:
            plan = await store.get_current_plan()
        for plan_id, _ in await store.list_plans(recent) if recent else []:
            found = await store.get_plan(plan_id)
            if found is not None:
                plans.append(found)
        loop = await loop_summary(store)
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
        "engines": [engine_dict(e) for e in engines],
        "plan": None if plan is None else plan_dict(plan),
        "plan_from": plan_from,
        "plans": [_summary(p) for p in plans],
        "loop": loop,
    }, plan


async def current_plan(address: str, timeout_s: float) -> Plan | None:
    """The current plan, asked of the Planner service at ``address`` (None when there is none).

    Raises ``UnavailableError`` naming the planner when it does not answer in ``timeout_s``."""
    async with channels.aio_channel(address) as channel:
        stub = planner_pb2_grpc.PlannerStub(channel)
        try:
            response = await stub.GetPlan(planner_pb2.GetPlanRequest(), timeout=timeout_s)
        except grpc.aio.AioRpcError as exc:
            if exc.code() == grpc.StatusCode.NOT_FOUND:
                return None
            raise error_from_rpc(exc, target=f"planner at {address}") from None
    return plan_from_pb(response.plan)


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


def _summary(plan: Plan) -> dict[str, Any]:
    return {
        "id": plan.id,
        "created_at": plan.created_at,
        "gpus": plan.gpus,
        "objective_s": plan.objective_s,
        "workflows": {w.workflow: w.target_rps for w in plan.workflows},
    }


def format_status(doc: dict[str, Any], current: Plan | None) -> str:
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
    if doc.get("engines"):
        rows = [
            ("ENGINE", "NODE", "STATE", "GPUS", "UNITS", "MPS %", "MEM", "ENDPOINT", "RESTARTS")
        ]
        for e in doc["engines"]:
            rows.append(
                (
                    e["id"],
                    e["node"],
                    e["state"],
                    _devices(e),
                    str(e["units"]),
                    str(e["mps_percentage"]),
                    f"{e['memory_fraction']:.2f}",
                    e["endpoint"] or "-",
                    str(e["restarts"]),
                )
            )
        lines += _table(rows)
        for e in doc["engines"]:
            if e["last_error"]:
                lines.append(f"  {e['id']}: {e['last_error'].splitlines()[0]}")
        lines.append("")
    if current is None:
        lines.append("plan  none (run `scepsy plan --spec SPEC`)")
    else:
        lines.append(f"current plan (from the {doc['plan_from']}):")
        lines.append(format_plan(current))
    if doc["plans"]:
        lines.append("recent plans:")
        for p in doc["plans"]:
            mark = "*" if current is not None and p["id"] == current.id else " "
            rates = ", ".join(f"{w} {r:g} req/s" for w, r in p["workflows"].items())
            lines.append(
                f" {mark} {p['id']}  {_when(p['created_at'])}  {p['gpus']:g} GPUs  "
                f"latency {p['objective_s']:.3f} s  {rates}"
            )
    if doc.get("loop") is not None:
        lines.append(summary_line(doc["loop"]))
    return "\n".join(lines)


def _devices(engine: dict[str, Any]) -> str:
    gpus = ",".join(map(str, engine["gpus"]))
    cpus = ",".join(map(str, engine["cpus"]))
    return f"{gpus} (cpus {cpus})" if cpus else gpus


def _when(ts: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ts))


def _table(rows: list[tuple[str, ...]]) -> list[str]:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]
