"""The ALP against the simulator on Scepsy's chosen plans (the simulator is the ground truth).

For every workflow and GPU count: the warm-up trace, statistics and profiles as the evaluation
makes them (``systems.Context.prepare`` on the smallest GPU count); then

- latency: at ``--fractions`` of the ALP's highest throughput on those GPUs, Scepsy plans for the
  rate, the simulator serves Poisson arrivals on the plan, and the ALP's predicted mean request
  latency is compared with the measured one (sustainable points only);
- throughput: Scepsy's maximum-throughput plan, its predicted throughput against the simulated
  capacity: the **work rate** of a run offered ``--overload`` x the prediction for ``--span``
  isolated request latencies (``capacity_check``): per LLM, its calls that ended inside the
  measurement window per second over its calls per request; the smallest over the LLMs (the
  bottleneck's). The completion rate of requests inside the window (the reference before) is
  printed beside it: under overload it under-states capacity for workflows of many rounds
  (beam search: a request's rounds queue behind those of every other request in flight, so
  the backlog's half-done work grows and completions lag the work done; 0.92 completions/s
  where the engines did 1.18 request-equivalents/s and 1.04 req/s was sustained).

Two predictions per point: the closed-form ALP's, and the refined one Scepsy plans with by
default (``services.core.planning.refine``: its best closed-form candidates simulated on a replay
of the warm-up trace, ``services.core.sim.replay``; for throughput the replay's work rate when
offered ``--overload`` x the closed-form throughput).
``--closed`` plans with the closed form only (the refined column is then empty). ``--warmup``:
requests of the warm-up trace the statistics come from, or ``auto[:E]``: as many as
``systems.warmup_needed`` says (the evaluation's default, auto:0.01; ReAct's data-dependent loop
needs thousands for its means to settle, README). Error = (predicted - simulated) / simulated.
Prints one row per point and a summary per workflow (median and worst |error| of each).

    .venv/bin/python scripts/bench_alp.py [--workflows rag,beam,...] [--gpus 4,8,16] [--closed]
                                          [--warmup N|auto[:E]] [--scale K] [--json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from services.cli.bench import warmup_changes  # noqa: E402
from services.core.errors import InfeasibleError, ScepsyError  # noqa: E402
from services.core.sim.arrivals import poisson  # noqa: E402
from services.core.sim.measure import measure, work_rate  # noqa: E402
from services.core.sim.results import BenchSettings  # noqa: E402
from services.core.sim.runs import Counter, load_at, run_point  # noqa: E402
from services.core.sim.scoring import describe  # noqa: E402
from services.core.sim.systems import SYSTEMS, Context  # noqa: E402
from services.core.sim.workflows import WORKFLOWS, workflow  # noqa: E402

SEED_POINT = 31
SEED_THROUGHPUT = 991
MAX_CALLS = 250_000


def measure_workflow(
    name: str,
    gpu_counts: Sequence[int],
    fractions: Sequence[float],
    settings: BenchSettings,
    kinds: Sequence[str] = ("latency", "throughput"),
    overload: float = 1.3,
    span: float = 60.0,
    closed: bool = False,
    scale: int = 1,
) -> list[dict[str, Any]]:
    ctx = Context.prepare(
        workflow(name),
        settings.gpu_type,
        min(gpu_counts),
        **settings.warmup(),
        options=replace(settings.options, seed=settings.seed),
    )
    print(f"{name}: warm-up of {len(ctx.warmup.requests)} requests", file=sys.stderr)
    if closed:
        ctx = replace(ctx, refine=None)
    counter = Counter()
    rows: list[dict[str, Any]] = []
    for gpus in gpu_counts:
        capacity = ctx.capacity(gpus)
        for i, f in enumerate(fractions if "latency" in kinds else ()):
            rate = f * capacity
            try:
                plan = SYSTEMS["scepsy"](ctx, gpus, rate)
            except InfeasibleError:
                continue
            load = load_at(ctx, rate, SEED_POINT + i, settings)
            load = replace(load, requests=load.requests * scale)
            point = run_point(ctx, plan, load, gpus, settings, counter)
            if plan.prediction is None or plan.planned_rate is not None or not point.sustainable:
                continue
            rows.append(
                _row(
                    name,
                    gpus,
                    "latency",
                    rate,
                    point.allocation,
                    ctx.latency_of(plan.prediction),
                    point.mean_latency,
                    plan.simulated_latency,
                )
            )
        if "throughput" in kinds:
            found = capacity_check(ctx, gpus, capacity, overload, span)
            if found is not None:
                rows.append(_row(name, gpus, "throughput", *found))
    return rows


def capacity_check(
    ctx: Context, gpus: int, capacity: float, overload: float, span: float
) -> tuple[float, str, float, float, float | None, float] | None:
    """(offered rate, allocation, predicted, simulated, refined throughput, simulated completion
    rate) of Scepsy's maximum-throughput plan: Poisson arrivals at ``overload`` x the prediction
    for ``span`` isolated request latencies (at least 400 requests, at most ``MAX_CALLS`` LLM
    calls). Simulated: ``work_rate`` of the run; refined: ``work_rate`` of the replayed trace
    offered the same rate (``ReplayScorer.capacity``); completion rate: requests
    completed inside the measurement window per second (the reference before)."""
    try:
        plan = SYSTEMS["scepsy"](ctx, gpus, capacity)
    except InfeasibleError:
        return None
    predicted = ctx.throughput_of(ctx.predict(plan.allocation, capacity))
    rate = predicted * overload
    most = max(400, int(MAX_CALLS / max(ctx.calls_per_request, 1.0)))
    requests = min(max(400, round(rate * span * ctx.isolated_latency)), most)
    result = ctx.serve(plan, poisson(rate, requests, SEED_THROUGHPUT), gpus=gpus, record=True)
    point = measure(result, rate)
    refined = ctx.scorer.capacity(plan.allocation, rate) if ctx.refine is not None else None
    return (
        rate,
        describe(plan.allocation),
        predicted,
        work_rate(result, point),
        refined,
        point.throughput,
    )


def _row(
    name: str,
    gpus: int,
    kind: str,
    rate: float,
    allocation: str,
    predicted: float,
    simulated: float,
    refined: float | None = None,
    completion: float | None = None,
) -> dict[str, Any]:
    return {
        "workflow": name,
        "gpus": gpus,
        "kind": kind,
        "rate": rate,
        "allocation": allocation,
        "predicted": predicted,
        "refined": refined,
        "simulated": simulated,
        "error": (predicted - simulated) / simulated,
        "refined_error": None if refined is None else (refined - simulated) / simulated,
        "completion": completion,  # throughput rows: the simulated completion rate
    }


def summary(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    out = []
    keys = dict.fromkeys((r["workflow"], r["kind"]) for r in rows)
    for name, kind in keys:
        mine = [r for r in rows if r["workflow"] == name and r["kind"] == kind]
        errs = [abs(r["error"]) for r in mine]
        refined = [abs(r["refined_error"]) for r in mine if r["refined_error"] is not None]
        out.append(
            {
                "workflow": name,
                "kind": kind,
                "points": len(errs),
                "median_abs_error": statistics.median(errs),
                "worst_abs_error": max(errs),
                "refined_median_abs_error": statistics.median(refined) if refined else None,
                "refined_worst_abs_error": max(refined) if refined else None,
            }
        )
    return out


def _num(value: float | None, fmt: str) -> str:
    width = fmt.lstrip("+")[0]
    return f"{'-':>{width}}" if value is None else f"{value:{fmt}}"


def render(rows: Sequence[dict[str, Any]]) -> str:
    """The text report: one line per point, then the summary per workflow and kind."""
    lines = [
        f"{'workflow':10} {'GPUs':>4} {'kind':10} {'req/s':>7} {'closed':>8} {'refined':>8} "
        f"{'sim':>8} {'err':>6} {'r.err':>6} {'sim.c':>6}  allocation"
    ]
    for r in rows:
        lines.append(
            f"{r['workflow']:10} {r['gpus']:>4} {r['kind']:10} {r['rate']:>7.3g} "
            f"{r['predicted']:>8.3g} {_num(r['refined'], '8.3g')} {r['simulated']:>8.3g} "
            f"{r['error']:>+6.0%} {_num(r['refined_error'], '+6.0%')} "
            f"{_num(r.get('completion'), '6.3g')}  {r['allocation']}"
        )
    lines += [
        "",
        f"{'workflow':10} {'kind':10} {'points':>6} {'closed median/worst':>20} "
        f"{'refined median/worst':>21}",
    ]
    for s in summary(rows):
        closed = f"{s['median_abs_error']:.0%}/{s['worst_abs_error']:.0%}"
        refined = (
            "-"
            if s["refined_median_abs_error"] is None
            else f"{s['refined_median_abs_error']:.0%}/{s['refined_worst_abs_error']:.0%}"
        )
        lines.append(
            f"{s['workflow']:10} {s['kind']:10} {s['points']:>6} {closed:>20} {refined:>21}"
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workflows", default=",".join(WORKFLOWS))
    parser.add_argument("--gpus", default="4,8,16")
    parser.add_argument("--fractions", default="0.3,0.6,0.85")
    parser.add_argument("--kinds", default="latency,throughput", help="what to check")
    parser.add_argument("--overload", type=float, default=1.3, help="x predicted throughput")
    parser.add_argument(
        "--span", type=float, default=60.0, help="throughput runs: isolated latencies of arrivals"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--closed", action="store_true", help="plan with the closed form only")
    parser.add_argument(
        "--warmup",
        metavar="N|auto[:E]",
        help="warm-up trace requests, or auto[:E]: enough for a relative standard error of E "
        "of the mean LLM time per request (default: the bench's, auto:0.01)",
    )
    parser.add_argument("--max-calls", type=int, default=120_000, help="LLM calls per run")
    parser.add_argument(
        "--scale",
        type=int,
        default=1,
        help="latency rows: the simulator's reference runs take this x the requests (near "
        "capacity a run's latency still grows with its length)",
    )
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    if args.scale < 1:
        print(f"error: --scale: need >= 1, got {args.scale}", file=sys.stderr)
        return 2
    gpus = [int(g) for g in args.gpus.split(",")]
    fractions = [float(f) for f in args.fractions.split(",")]
    # long runs: the reference is the steady state (short runs near capacity under-state it)
    settings = replace(
        BenchSettings(), seed=args.seed, max_calls=args.max_calls, duration=120.0, min_requests=300
    )
    if args.warmup is not None:
        settings = replace(settings, **warmup_changes(args.warmup))
    started = time.perf_counter()
    rows: list[dict[str, Any]] = []
    try:
        for name in args.workflows.split(","):
            rows += measure_workflow(
                name,
                gpus,
                fractions,
                settings,
                args.kinds.split(","),
                args.overload,
                args.span,
                args.closed,
                args.scale,
            )
            print(f"[{time.perf_counter() - started:6.1f}s] {name} done", file=sys.stderr)
    except ScepsyError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps({"points": rows, "summary": summary(rows)}))
        return 0
    print(render(rows))
    print(f"\n{time.perf_counter() - started:.1f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
