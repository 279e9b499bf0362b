"""``scepsy plan``: search, place and show a plan (``scepsy status`` shows the current one).

``scepsy plan --spec SPEC [--cluster FILE] [--json] [--offline] [--store [--redis-url URL]]``:
when a suite is up (``scepsy up``) the spec goes to the Planner service, which gets profiles
from the Profiler and placements from the Placer, plans around the running placement, stores
the plan and makes it current. Otherwise (or with ``--offline``) the one plan path runs
in-process: profiles stored in Redis first when ``--store`` names one, else computed with the
profiler's backends; placed on the spec's cluster (or the cluster file), around the current
plan's placement when ``--store`` is given. Either way it prints the allocation per LLM, the
predicted latency and throughput per workflow, where the profiles came from, the search time
and the placement. An infeasible spec exits with status 2 and says why, with the best
throughput the GPUs reach.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from pathlib import Path
from typing import cast

import grpc

from protos.scepsy.v1 import planner_pb2, planner_pb2_grpc
from services.cli.cluster import read_state
from services.cli.store_args import add_store_flags, connect_store
from services.core.cluster.declared import load_cluster
from services.core.errors import InvalidInputError, UnavailableError
from services.core.placement.heuristic import Assignment
from services.core.planning.plan import Plan, PlanInputs, make_plan, plan_dict, with_nodes
from services.core.planning.profiles import SpecProfiles, StoreFirst
from services.core.workload.spec import Spec, load_spec
from services.profiler.backends import BACKENDS
from services.runtime import channels
from services.runtime.convert import plan_from_pb
from services.runtime.errors import error_from_rpc
from services.runtime.profile_pool import prefetch_cold, shared_pool
from services.runtime.store import Store, profiles_from_thread


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    plan = sub.add_parser("plan", help="search and place the allocation of a deployment spec")
    plan.add_argument("--spec", required=True, help="deployment spec (YAML or JSON)")
    plan.add_argument("--cluster", metavar="FILE", help="cluster YAML instead of the spec's")
    plan.add_argument("--json", action="store_true", help="print one JSON object")
    plan.add_argument(
        "--offline", action="store_true", help="plan in-process even when a suite is up"
    )
    plan.add_argument(
        "--store", action="store_true", help="offline: store the plan and make it current"
    )
    plan.add_argument(
        "--timeout", type=float, default=120.0, help="seconds to wait for the Planner service"
    )
    plan.add_argument(
        "--profile-workers",
        type=int,
        default=0,
        help="in-process: worker processes for cold profiles (0: one per CPU; 1: none)",
    )
    add_store_flags(plan)
    plan.set_defaults(func=run_plan)


# ------------------------------------------------------------------------------ plan
def run_plan(args: argparse.Namespace) -> int:
    address = None if args.offline else planner_address()
    stored = None
    if address is not None:
        if args.store:
            raise InvalidInputError("--store: the Planner service stores every plan; drop --store")
        plan = plan_remote(args, address)
        stored = True
    else:
        plan, stored = plan_offline(args)
    if args.json:
        doc = plan_dict(plan)
        if stored is not None:
            doc["stored"] = {"new": stored, "current": True}
        doc["planner"] = address or "in-process"
        print(json.dumps(doc))
    else:
        print(format_plan(plan))
        where = f"the Planner service at {address}" if address else "in-process"
        if stored is not None:
            print(f"plan {plan.id} planned by {where}, stored and made current")
    return 0


def planner_address() -> str | None:
    """The Planner of the suite ``scepsy up`` started here, if one is up (by the state file)."""
    state = read_state()
    service = (state or {}).get("services", {}).get("planner")
    return str(service["address"]) if service else None


def plan_remote(args: argparse.Namespace, address: str) -> Plan:
    """The spec planned by the Planner service at ``address``."""
    spec_text = _read(args.spec, "--spec")
    cluster_text = _read(args.cluster, "--cluster") if args.cluster else ""
    request = planner_pb2.PlanRequest(spec_yaml=spec_text, cluster_yaml=cluster_text)
    with channels.channel(address) as channel:
        try:
            response = planner_pb2_grpc.PlannerStub(channel).Plan(request, timeout=args.timeout)
        except grpc.RpcError as exc:
            code = cast(grpc.Call, exc).code()
            if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
                raise UnavailableError(
                    f"planner at {address}: {code.name.lower()} (`scepsy status`; or plan "
                    "with --offline)"
                ) from None
            raise error_from_rpc(exc) from None
    return plan_from_pb(response.plan)


def plan_offline(args: argparse.Namespace) -> tuple[Plan, bool | None]:
    """The one plan path in-process; with ``--store``, around the current plan, profiles read
    from and stored in Redis, the plan stored and made current."""
    workers = args.profile_workers
    if workers < 0:
        raise InvalidInputError(f"--profile-workers: must be >= 0, got {workers}")
    pool = shared_pool(workers)

    def prefetch(profiles: SpecProfiles, spec: Spec) -> None:
        prefetch_cold(profiles, pool, spec)

    spec = load_spec(args.spec)
    if args.cluster:
        spec = with_nodes(spec, load_cluster(args.cluster))
    nodes = spec.nodes
    spec_text = _read(args.spec, "--spec")
    if not args.store:
        profiles = SpecProfiles(spec, StoreFirst(BACKENDS))
        inputs = PlanInputs(spec_text, spec, nodes, profiles, prefetch=prefetch)
        return make_plan(inputs), None

    async def run(store: Store) -> tuple[Plan, bool]:
        loop = asyncio.get_running_loop()
        current = await store.get_current_plan()
        running: tuple[Assignment, ...] = current.placement.assignments if current else ()

        get, put = profiles_from_thread(store, loop, timeout_s=30)
        profiles = SpecProfiles(spec, StoreFirst(BACKENDS, get=get, put=put))
        inputs = PlanInputs(spec_text, spec, nodes, profiles, running, prefetch=prefetch)
        plan = await asyncio.to_thread(make_plan, inputs)
        return plan, await store.put_plan(plan)

    async def main() -> tuple[Plan, bool]:
        store = connect_store(args)
        try:
            return await run(store)
        finally:
            await store.close()

    return asyncio.run(main())


def _read(path: str, flag: str) -> str:
    try:
        return Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise InvalidInputError(f"{flag}: cannot read {path!r}: {exc.strerror}") from None


# ------------------------------------------------------------------------------ text
def format_plan(plan: Plan) -> str:
    """The plan as a few aligned tables: allocation, workflows, search, placement."""
    k = plan.fraction_unit
    cluster = sum(len(n.gpus) for n in plan.nodes)
    lines = [
        f"plan {plan.id}  created {_when(plan.created_at)}  {plan.gpus:g} of {cluster} GPUs  "
        f"(k {k}, rho {plan.rho:g})",
        f"  {'llm':<20} {'tp':>3} {'fraction':>8} {'replicas':>8} {'GPUs':>6} "
        f"{'load/s':>9} {'util':>6} {'s/call':>8}",
    ]
    llms = {m.model: m for m in plan.llms}
    for model, a in plan.allocation.items():
        m = llms[model]
        lines.append(
            f"  {model:<20} {a.tp:>3} {_fraction(a.fraction, k):>8} {a.replicas:>8} "
            f"{a.gpus:>6g} {m.load_cps:>9.3f} {m.utilization:>6.2f} {m.call_latency_s:>8.3f}"
        )
    lines.append(
        f"  {'workflow':<20} {'target/s':>9} {'latency s':>10} {'throughput/s':>13} {'weight':>7}"
    )
    for w in plan.workflows:
        lines.append(
            f"  {w.workflow:<20} {w.target_rps:>9.3f} {w.latency_s:>10.3f} "
            f"{w.throughput_rps:>13.3f} {w.weight:>7g}"
        )
    lines.append(
        f"  search {plan.search_seconds:.3f} s (profiles {plan.profile_seconds:.3f} s, "
        f"search and placement {plan.search_seconds - plan.profile_seconds:.3f} s), "
        f"{plan.rounds} round(s); weighted latency {plan.objective_s:.3f} s"
    )
    lines.extend(f"  constraint {note}" for note in plan.constraints)
    lines.extend(f"  refined {note}" for note in plan.refinement)
    sources = [
        f"{m.model}: " + ", ".join(f"{n} {how}" for how, n in m.profile_sources.items())
        for m in plan.llms
        if m.profile_sources
    ]
    if sources:
        lines.append("  profiles " + "; ".join(sources))
    lines.extend(_placement_lines(plan))
    return "\n".join(lines)


def _placement_lines(plan: Plan) -> list[str]:
    k = plan.fraction_unit
    lines = ["  placement:"]
    for a in plan.placement.assignments:
        gpus = ",".join(str(g) for g in a.gpus)
        lines.append(
            f"    {a.model}#{a.replica:<3} {a.node:<12} GPU {gpus:<16} "
            f"{_fraction(a.units / k, k):>5} mps {a.mps_percentage:>3}% "
            f"memory cap {a.memory_fraction:.4g}"
        )
    f = plan.placement.fragmentation
    lines.append(
        f"  fragmentation: {f.partly_used_gpus} partly used GPU(s), {f.stranded_fraction:g} GPU "
        f"stranded, {f.free_gpus} free GPU(s), largest free TP group {f.largest_free_tp}"
    )
    return lines


def _fraction(fraction: float, k: int) -> str:
    units = round(fraction * k)
    return "1" if units == k else f"{units}/{k}"


def _when(ts: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ts))
