"""``scepsy plan`` and ``scepsy status``: search, place and show a plan; read the current one.

``scepsy plan --spec SPEC [--cluster FILE] [--json] [--store [--redis-url URL]]`` searches the
spec's allocation (GPU fraction x TP x replicas per LLM, optimal under the ALP), places it on the
spec's cluster (or the cluster file) and prints the allocation per LLM, the predicted latency and
throughput per workflow, the search time (and how much of it computing profiles) and the
placement. Profiles come from the analytic backend, once per (model, TP, fraction). With
``--store`` the plan is stored in Redis under its content hash and made current, as the planner
service does. An infeasible spec exits with status 2 and says why, with the best throughput the
GPUs reach.

``scepsy status [--json] [--redis-url URL] [--recent N]`` prints the current plan and its
placement, and the most recent plans.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from pathlib import Path
from typing import Any

from services.cli.store_args import add_store_flags, connect_store
from services.core.cluster.declared import load_cluster
from services.core.errors import InvalidInputError
from services.core.planning.plan import Plan, build_plan, plan_dict, with_nodes
from services.core.planning.profiles import AnalyticProfiles
from services.core.workload.spec import load_spec


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    plan = sub.add_parser("plan", help="search and place the allocation of a deployment spec")
    plan.add_argument("--spec", required=True, help="deployment spec (YAML or JSON)")
    plan.add_argument("--cluster", metavar="FILE", help="cluster YAML instead of the spec's")
    plan.add_argument("--json", action="store_true", help="print one JSON object")
    plan.add_argument("--store", action="store_true", help="store the plan and make it current")
    add_store_flags(plan)
    plan.set_defaults(func=run_plan)

    status = sub.add_parser("status", help="the current plan, its placement and recent plans")
    status.add_argument("--json", action="store_true", help="print one JSON object")
    status.add_argument("--recent", type=int, default=5, help="recent plans to list (default 5)")
    add_store_flags(status)
    status.set_defaults(func=run_status)


# ------------------------------------------------------------------------------ plan
def run_plan(args: argparse.Namespace) -> int:
    spec = load_spec(args.spec)
    if args.cluster:
        spec = with_nodes(spec, load_cluster(args.cluster))
    profiles = AnalyticProfiles(spec)
    plan = build_plan(
        Path(args.spec).read_text(encoding="utf-8"),
        spec,
        profiles.profile,
        created_at=time.time(),
        profile_seconds=lambda: profiles.seconds,
    )
    stored = None
    if args.store:
        stored = asyncio.run(_put(args, plan))
    if args.json:
        doc = plan_dict(plan)
        if stored is not None:
            doc["stored"] = {"new": stored, "current": True}
        print(json.dumps(doc))
    else:
        print(format_plan(plan))
        if stored is not None:
            state = "stored" if stored else "already stored"
            print(f"plan {plan.id} {state} and made current")
    return 0


async def _put(args: argparse.Namespace, plan: Plan) -> bool:
    store = connect_store(args)
    try:
        return await store.put_plan(plan)
    finally:
        await store.close()


# ------------------------------------------------------------------------------ status
def run_status(args: argparse.Namespace) -> int:
    if args.recent < 0:
        raise InvalidInputError(f"--recent: must be >= 0, got {args.recent}")
    current, recent = asyncio.run(_read_status(args))
    if args.json:
        doc = {
            "current": plan_dict(current) if current is not None else None,
            "plans": [_summary(p) for p in recent],
        }
        print(json.dumps(doc))
        return 0
    if current is None:
        print("no current plan (run `scepsy plan --spec SPEC --store` or the planner service)")
    else:
        print(format_plan(current))
    if recent:
        print("recent plans:")
        for p in recent:
            mark = "*" if current is not None and p.id == current.id else " "
            print(
                f" {mark} {p.id}  {_when(p.created_at)}  {p.gpus:g} GPUs  "
                f"latency {p.objective_s:.3f} s  "
                + ", ".join(f"{w.workflow} {w.target_rps:g} req/s" for w in p.workflows)
            )
    return 0


async def _read_status(args: argparse.Namespace) -> tuple[Plan | None, list[Plan]]:
    store = connect_store(args)
    try:
        current = await store.get_current_plan()
        recent = []
        for plan_id, _ in await store.list_plans(args.recent) if args.recent else []:
            plan = await store.get_plan(plan_id)
            if plan is not None:
                recent.append(plan)
        return current, recent
    finally:
        await store.close()


def _summary(plan: Plan) -> dict[str, Any]:
    return {
        "id": plan.id,
        "created_at": plan.created_at,
        "gpus": plan.gpus,
        "objective_s": plan.objective_s,
        "workflows": {w.workflow: w.target_rps for w in plan.workflows},
    }


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
