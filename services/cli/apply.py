"""``scepsy apply --spec SPEC [--dry-run] [--wait] [--timeout S]``: a spec becomes running engines.

1. The spec is read here (weights paths checked, made absolute; model configs on disk inlined),
   then planned by the Planner service of the suite (``scepsy up``) and stored, not yet current.
2. The change against what runs (the agents' ``ListEngines``): engines started, stopped, kept,
   moved. ``--dry-run`` stops here.
3. The plan becomes current (``Planner.SetCurrentPlan``); each node's agent reconciles its engines
   to it, new ones before old ones stop where the GPUs allow.
4. ``--wait``: until every engine of the plan is READY (healthy and registered with the router)
   and the old ones are gone; exit 1 naming the engines that failed (with the tail of their logs)
   or that were not ready within ``--timeout``.

Applying the same spec again plans the same placement (the running one is kept) and changes
nothing.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import grpc
import yaml

from protos.scepsy.v1 import agent_pb2, agent_pb2_grpc, planner_pb2, planner_pb2_grpc
from protos.scepsy.v1 import types_pb2 as pb
from services.cli.cluster import resolve_redis_url
from services.cli.plan import planner_address
from services.core.errors import InvalidInputError, UnavailableError
from services.core.planning.plan import Plan
from services.core.serving import EngineIntent, Occupant, Rollout, intended_engines, rollout
from services.core.workload.spec import DiskFiles, parse_spec
from services.runtime import channels
from services.runtime.convert import assignment_from_pb, plan_from_pb
from services.runtime.errors import error_from_rpc
from services.runtime.store import Store

S = pb.EngineState
LIVE = (S.ENGINE_STATE_STARTING, S.ENGINE_STATE_READY, S.ENGINE_STATE_DRAINING)
STATE_NAMES = {
    S.ENGINE_STATE_UNSPECIFIED: "unknown",
    S.ENGINE_STATE_STARTING: "starting",
    S.ENGINE_STATE_READY: "ready",
    S.ENGINE_STATE_FAILED: "failed",
    S.ENGINE_STATE_STOPPED: "stopped",
    S.ENGINE_STATE_DRAINING: "draining",
}


def register(sub: Any) -> None:
    apply = sub.add_parser(
        "apply",
        help="plan a spec and make it run: engines started, stopped, kept or moved",
        description=__doc__.split("\n\n", 1)[1] if __doc__ else None,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    apply.add_argument("--spec", required=True, help="deployment spec (YAML)")
    apply.add_argument(
        "--dry-run", action="store_true", help="plan and show the change, run nothing"
    )
    apply.add_argument(
        "--wait", action="store_true", help="wait until every engine is ready, or failed"
    )
    apply.add_argument(
        "--timeout", type=float, default=600.0, help="seconds --wait waits at most (600)"
    )
    apply.add_argument(
        "--rpc-timeout", type=float, default=120.0, help="deadline of each RPC (120)"
    )
    apply.add_argument(
        "--planner",
        help="Planner HOST:PORT (default: $SCEPSY_PLANNER_ADDRESS, else `scepsy up`'s)",
    )
    apply.add_argument("--redis-url", help="Redis of the suite (default: `scepsy up`'s)")
    apply.add_argument("--json", action="store_true", help="print the result as JSON")
    apply.set_defaults(func=cmd_apply)


def cmd_apply(args: argparse.Namespace) -> int:
    if args.timeout <= 0:
        raise InvalidInputError(f"--timeout: must be > 0, got {args.timeout:g}")
    address = args.planner or os.environ.get("SCEPSY_PLANNER_ADDRESS") or planner_address()
    if not address:
        raise UnavailableError(
            "no Planner: run `scepsy up` first, or give --planner HOST:PORT "
            "(or SCEPSY_PLANNER_ADDRESS) of a deployed one"
        )
    spec_text = self_contained(Path(args.spec))
    return asyncio.run(_apply(args, address, spec_text))


def self_contained(path: Path) -> str:
    """The spec at ``path`` as text the Planner service can plan on its own: weights paths made
    absolute (checked here), model configs read from disk inlined. ``InvalidInputError`` names
    the field of anything wrong."""
    doc = _read_doc(path)
    checked = doc if "cluster" in doc else {**doc, "cluster": {"gpu_type": "cpu", "gpus": 1}}
    # validates everything, weights paths included (the cluster is the live one: any will do)
    spec = parse_spec(checked, source=path.name, files=DiskFiles(path.parent))
    models: dict[str, Any] = {}
    for name, ref in doc["models"].items():
        serving = spec.serving[name]
        entry: dict[str, Any] = dict(ref) if isinstance(ref, dict) else {}
        if isinstance(ref, str) and not ref.endswith(".json"):
            entry = {"model": ref}
        elif isinstance(ref, str) or isinstance(entry.get("config"), str):
            config_path = path.parent / (ref if isinstance(ref, str) else entry["config"])
            if config_path.is_dir():
                config_path = config_path / "config.json"
            entry["config"] = json.loads(config_path.read_text(encoding="utf-8"))
        entry["weights"] = serving.weights
        models[name] = entry
    doc["models"] = models
    doc.pop("cluster", None)  # the Planner plans on the live nodes
    return yaml.safe_dump(doc, sort_keys=False)


def _read_doc(path: Path) -> dict[str, Any]:
    try:
        doc = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise InvalidInputError(f"--spec: cannot read {str(path)!r}: {exc.strerror}") from None
    except yaml.YAMLError as exc:
        raise InvalidInputError(f"{path.name}: not valid YAML: {exc}") from None
    except RecursionError:
        raise InvalidInputError(f"{path.name}: nested too deeply to be a spec") from None
    if not isinstance(doc, dict):
        raise InvalidInputError(f"{path.name}: top level: must be a mapping")
    return doc


async def _apply(args: argparse.Namespace, address: str, spec_text: str) -> int:
    store = Store.connect(resolve_redis_url(args.redis_url))
    try:
        async with channels.aio_channel(address) as channel:
            planner = planner_pb2_grpc.PlannerStub(channel)
            try:
                reply = await planner.Plan(
                    planner_pb2.PlanRequest(spec_yaml=spec_text, dry_run=True),
                    timeout=args.rpc_timeout,
                )
            except grpc.aio.AioRpcError as exc:
                raise error_from_rpc(exc, target=f"planner at {address}") from None
            plan = plan_from_pb(reply.plan)
            running = await running_engines(store, args.rpc_timeout)
            change = rollout(
                intended_engines(plan),
                [_occupant(e, plan.fraction_unit) for e in running if e.state in LIVE],
            )
            current = await store.current_plan_id()
            doc: dict[str, Any] = {"plan": plan.id, "change": change_dict(change), "engines": []}
            if not args.json:
                print(format_change(plan, change))
            if args.dry_run:
                if not args.json:
                    print(f"dry run: plan {plan.id} stored, not made current")
                else:
                    print(json.dumps(doc))
                return 0
            if current != plan.id:
                try:
                    await planner.SetCurrentPlan(
                        planner_pb2.SetCurrentPlanRequest(id=plan.id), timeout=args.rpc_timeout
                    )
                except grpc.aio.AioRpcError as exc:
                    raise error_from_rpc(exc, target=f"planner at {address}") from None
            if not args.json:
                print(f"plan {plan.id} is current" + ("" if change.changes else ": no changes"))
            if not args.wait:
                if args.json:
                    print(json.dumps(doc))
                return 0
            code, engines = await wait_settled(store, plan, args)
            doc["engines"] = [engine_dict(e) for e in engines]
            if args.json:
                print(json.dumps(doc))
            return code
    finally:
        await store.close()


async def running_engines(store: Store, timeout_s: float) -> list[pb.Engine]:
    """Every node's engines, asked of its agent (``NodeAgent.ListEngines``); a node whose agent
    does not answer counts with its last records in Redis."""
    nodes = await store.list_nodes()
    recorded: list[pb.Engine] | None = None  # read only for an agent that does not answer
    out: list[pb.Engine] = []
    for node in nodes:
        engines = None
        if node.agent_address:
            try:
                async with channels.aio_channel(node.agent_address) as channel:
                    reply = await agent_pb2_grpc.NodeAgentStub(channel).ListEngines(
                        agent_pb2.ListEnginesRequest(), timeout=min(timeout_s, 10.0)
                    )
                engines = list(reply.engines)
            except grpc.aio.AioRpcError:
                engines = None
        if engines is None:
            if recorded is None:
                recorded = await store.list_engines()
            engines = [e for e in recorded if e.node == node.name]
        out.extend(engines)
    return out


def _occupant(engine: pb.Engine, k: int) -> Occupant:
    a = assignment_from_pb(engine.assignment, k)
    return Occupant(engine.id, engine.model, a.replica, a)


async def wait_settled(
    store: Store, plan: Plan, args: argparse.Namespace
) -> tuple[int, list[pb.Engine]]:
    """Poll the agents until the plan's engines are all READY or FAILED and no engine outside
    the plan is live; 0 when all are READY, else 1 with the failures named on stderr."""
    wanted = {e.id: e for e in intended_engines(plan)}
    deadline = time.monotonic() + args.timeout
    last_line = ""
    while True:
        engines = await running_engines(store, args.rpc_timeout)
        by_id = {e.id: e for e in engines}
        states = {i: by_id[i].state if i in by_id else S.ENGINE_STATE_UNSPECIFIED for i in wanted}
        ready = [i for i, s in states.items() if s == S.ENGINE_STATE_READY]
        failed = [i for i, s in states.items() if s == S.ENGINE_STATE_FAILED]
        leftover = [e.id for e in engines if e.id not in wanted and e.state in LIVE]
        line = f"{len(ready)}/{len(wanted)} ready, {len(failed)} failed, {len(leftover)} stopping"
        if line != last_line and not args.json:
            print(f"  {line}", file=sys.stderr, flush=True)
            last_line = line
        if len(ready) + len(failed) == len(wanted) and not leftover:
            break
        if time.monotonic() > deadline:
            waiting = sorted(
                f"{i} ({STATE_NAMES.get(s, s)})"
                for i, s in states.items()
                if s not in (S.ENGINE_STATE_READY, S.ENGINE_STATE_FAILED)
            )
            print(
                f"error: timeout: after {args.timeout:g} s not ready: "
                f"{', '.join(waiting + [f'{i} (still running)' for i in leftover])}",
                file=sys.stderr,
            )
            return 1, engines
        await asyncio.sleep(1.0)
    if failed:
        for engine_id in sorted(failed):
            engine = by_id[engine_id]
            print(
                f"error: engine {engine_id} on {engine.node} failed: {engine.last_error}\n"
                f"  log: {engine.log_path}",
                file=sys.stderr,
            )
        print(f"error: failed engines: {', '.join(sorted(failed))}", file=sys.stderr)
        return 1, engines
    if not args.json:
        print(f"all {len(wanted)} engines ready and registered")
    return 0, engines


def change_dict(change: Rollout) -> dict[str, Any]:
    return {
        "started": [e.id for e in change.started],
        "stopped": [o.id for o in change.stopped],
        "kept": [e.id for e in change.kept],
        "moved": [[old.id, new.id] for old, new in change.moved],
    }


def engine_dict(engine: pb.Engine) -> dict[str, Any]:
    a = engine.assignment
    return {
        "id": engine.id,
        "model": engine.model,
        "node": engine.node,
        "state": STATE_NAMES.get(engine.state, str(engine.state)),
        "endpoint": engine.endpoint,
        "gpus": list(a.gpus),
        "units": a.units,
        "mps_percentage": a.mps_percentage,
        "memory_fraction": a.memory_fraction,
        "cpus": list(engine.cpus),
        "restarts": engine.restarts,
        "last_error": engine.last_error,
    }


def format_change(plan: Plan, change: Rollout) -> str:
    moved_new = {new.id for _, new in change.moved}
    moved_old = {old.id for old, _ in change.moved}
    rows: list[tuple[str, ...]] = [("CHANGE", "ENGINE", "NODE", "GPUS", "SHARE", "MPS %", "MEM")]

    def row(action: str, intent: EngineIntent | Occupant) -> tuple[str, ...]:
        a = intent.assignment
        share = f"{a.units}/{plan.fraction_unit}"
        return (
            action,
            intent.id,
            a.node,
            ",".join(map(str, a.gpus)),
            share,
            str(a.mps_percentage),
            f"{a.memory_fraction:.2f}",
        )

    for intent in change.kept:
        rows.append(row("keep", intent))
    for intent in change.started:
        rows.append(row("move" if intent.id in moved_new else "start", intent))
    for occupant in change.stopped:
        rows.append(row("stop (moved)" if occupant.id in moved_old else "stop", occupant))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]
    summary = (
        f"plan {plan.id}: {len(change.started)} to start ({len(change.moved)} moved), "
        f"{len(change.stopped)} to stop, {len(change.kept)} kept"
    )
    return "\n".join([summary, *lines])
