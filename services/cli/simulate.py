"""``scepsy simulate``: serve a workflow on a simulated cluster and report what happened.

    scepsy simulate --workflow W [--gpu-type G] --gpus N
                    (--system scepsy|static|independent|autoscaler | --allocation JSON)
                    --rate R [--requests N] [--arrivals poisson|FILE] [--seed S]
                    [--trace-out FILE] [--json]

``--system`` plans the allocation the way that system would (a warm-up run is traced first,
see ``services.core.sim.systems``); ``--allocation`` gives it directly, as one line of the
``scepsy predict`` allocations format. Arrivals are Poisson at ``--rate`` or replayed from a
recorded trace (an Azure LLM trace CSV or a Mooncake JSONL) rescaled to ``--rate``.
``--trace-out`` writes the trace the router would have recorded (the trace JSONL format), so
``scepsy trace stats`` and the planner run on it. Workflows: rag, beam, composite, react,
mapreduce.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from services.core.allocation import Allocation, check_fraction_unit
from services.core.errors import InvalidInputError
from services.core.sim.arrivals import load_timestamps, poisson, replay
from services.core.sim.measure import measure
from services.core.sim.scoring import describe
from services.core.sim.simulator import SimResult
from services.core.sim.systems import SYSTEMS, Context, Setup
from services.core.sim.workflows import WORKFLOWS, workflow
from services.core.workload.trace import write_trace

_ALLOCATION_FIELDS = {"fraction", "tp", "replicas"}


def register(sub: Any) -> None:
    parser = sub.add_parser("simulate", help="serve a workflow on a simulated cluster")
    parser.add_argument("--workflow", required=True, choices=sorted(WORKFLOWS))
    parser.add_argument("--gpu-type", default="H100-SXM", help="GPU type of the cluster")
    parser.add_argument("--gpus", type=int, required=True, help="GPUs in the cluster")
    how = parser.add_mutually_exclusive_group(required=True)
    how.add_argument("--system", choices=sorted(SYSTEMS), help="plan as this system would")
    how.add_argument("--allocation", metavar="JSON", help="allocation per model (predict format)")
    parser.add_argument("--rate", type=float, required=True, help="requests/s")
    parser.add_argument("--requests", type=int, default=500, help="requests to serve")
    parser.add_argument(
        "--arrivals", default="poisson", help="poisson, or an Azure CSV / Mooncake JSONL to replay"
    )
    parser.add_argument("--seed", type=int, default=0, help="random seed (requests, arrivals)")
    parser.add_argument("--trace-out", type=Path, help="write the simulated trace (JSONL)")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.set_defaults(func=cmd_simulate)


def cmd_simulate(args: argparse.Namespace) -> int:
    if args.gpus < 1 or args.requests < 2 or not args.rate > 0:
        raise InvalidInputError("--gpus >= 1, --requests >= 2 and --rate > 0 are needed")
    wf = workflow(args.workflow)
    ctx = Context.prepare(wf, args.gpu_type, args.gpus, warmup_requests=100)
    if args.system is not None:
        plan = SYSTEMS[args.system](ctx, args.gpus, args.rate)
    else:
        plan = Setup("given", parse_allocation(args.allocation, ctx))
    arrivals = arrival_times(args.arrivals, args.rate, args.requests, args.seed)
    started = time.perf_counter()
    result = ctx.serve(plan, arrivals, record=args.trace_out is not None, gpus=args.gpus)
    wall = time.perf_counter() - started
    if args.trace_out is not None:
        try:
            write_trace(args.trace_out, result.trace, result.requests)
        except OSError as exc:
            raise InvalidInputError(f"--trace-out: cannot write: {exc.strerror}") from None
    doc = summary(result, plan, args.rate, wall, ctx.groups(len(result.arrival)))
    print(json.dumps(doc) if args.json else format_summary(doc))
    return 0


def arrival_times(source: str, rate: float, n: int, seed: int) -> np.ndarray:
    if source == "poisson":
        return poisson(rate, n, seed)
    return replay(load_timestamps(source), rate, n)


def parse_allocation(text: str, ctx: Context) -> dict[str, Allocation]:
    """``{"model": {"fraction": F, "tp": T, "replicas": R}, ...}`` covering the workflow's LLMs."""
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as exc:
        raise InvalidInputError(f"--allocation: not valid JSON: {exc.msg}") from None
    if not isinstance(doc, dict) or sorted(doc) != sorted(ctx.models):
        raise InvalidInputError(f"--allocation: needs exactly the models {sorted(ctx.models)}")
    out: dict[str, Allocation] = {}
    for model, entry in doc.items():
        if not isinstance(entry, dict) or set(entry) - _ALLOCATION_FIELDS:
            raise InvalidInputError(
                f"--allocation: {model}: an object of {sorted(_ALLOCATION_FIELDS)}"
            )
        alloc = Allocation(
            float(entry.get("fraction", 1.0)), entry.get("tp", 1), entry.get("replicas", 1)
        )
        check_fraction_unit(model, alloc, ctx.fraction_unit)
        out[model] = alloc
    return out


def summary(
    result: SimResult,
    plan: Setup,
    rate: float,
    wall: float,
    groups: npt.NDArray[np.int64] | None = None,
) -> dict[str, Any]:
    """The run's figures; ``groups``: each request's part of a mix (``measure.measure``)."""
    point = measure(result, rate, groups=groups)
    return {
        "workflow": result.workflow,
        "system": plan.system,
        "allocation": {m: vars_of(a) for m, a in sorted(plan.allocation.items())},
        "allocation_text": describe(plan.allocation),
        "rate": rate,
        "requests": len(result.arrival),
        "measured_requests": point.requests,
        "throughput": point.throughput,
        "sustainable": point.sustainable,
        "backlog_growth": point.backlog_growth,
        "part_backlog_growth": list(point.part_growth),  # a mix's, per part
        "mean_latency": point.mean_latency,
        "p50_latency": point.p50_latency,
        "p99_latency": point.p99_latency,
        "calls": result.calls,
        "calls_by_model": result.calls_by_model,
        "preemptions": result.preemptions,
        "scaling_events": len(result.scaling),
        "simulated_seconds": result.end,
        "wall_seconds": wall,
        "calls_per_wall_second": result.calls / wall if wall > 0 else None,
    }


def vars_of(a: Allocation) -> dict[str, float | int]:
    return {"fraction": a.fraction, "tp": a.tp, "replicas": a.replicas}


def format_summary(doc: dict[str, Any]) -> str:
    calls = ", ".join(f"{m} {n}" for m, n in doc["calls_by_model"].items())
    verdict = "sustainable" if doc["sustainable"] else "NOT sustainable"
    growth = f"{doc['backlog_growth']:+.1%}"
    if doc["part_backlog_growth"]:
        growth += " (parts " + ", ".join(f"{g:+.1%}" for g in doc["part_backlog_growth"]) + ")"
    return "\n".join(
        [
            f"{doc['workflow']} on {doc['allocation_text']} ({doc['system']})",
            f"  {doc['requests']} requests at {doc['rate']:g} req/s: throughput "
            f"{doc['throughput']:.3g} req/s, backlog growth {growth}, {verdict}",
            f"  latency mean {doc['mean_latency']:.3f} s, p50 {doc['p50_latency']:.3f} s, "
            f"p99 {doc['p99_latency']:.3f} s ({doc['measured_requests']} measured)",
            f"  {doc['calls']} LLM calls ({calls}), {doc['preemptions']} preemptions, "
            f"{doc['scaling_events']} scaling events",
            f"  {doc['simulated_seconds']:.1f} s simulated in {doc['wall_seconds']:.2f} s wall",
        ]
    )
