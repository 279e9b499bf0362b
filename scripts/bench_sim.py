"""Speed of the workflow simulator: simulated LLM calls per second of wall time.

Serves ``--requests`` requests of each workflow (Poisson arrivals at ``--load`` x the ALP-free
capacity estimate below) on the static even split of ``--gpus`` GPUs and prints, per workflow,
the calls simulated, engine iterations, wall time and calls per wall second. The issue's target:
a 16-GPU beam-search run of 1,000 requests well under a minute.

    .venv/bin/python scripts/bench_sim.py [--gpus 16] [--requests 1000] [--workflows ...] [--json]

The arrival rate is set from the even split's profiled capacity: the rate at which its busiest
LLM runs at ``--load`` of its saturation rate (replicas x T_m / n_m, with n_m from a short
warm-up trace), so every workflow runs loaded but stable.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from services.core.errors import ScepsyError  # noqa: E402
from services.core.sim.arrivals import poisson  # noqa: E402
from services.core.sim.systems import SYSTEMS, Context  # noqa: E402
from services.core.sim.workflows import WORKFLOWS, workflow  # noqa: E402


def stable_rate(ctx: Context, gpus: int, load: float) -> float:
    """Requests/s at which the even split's busiest LLM runs at ``load`` of its capacity."""
    plan = SYSTEMS["static"](ctx, gpus, 1.0)
    capacity = min(
        plan.allocation[m].replicas
        * ctx.profiles.profile(m, plan.allocation[m].tp, 1.0).saturation_rate
        / calls
        for m, calls in ctx.loads(1.0).items()
    )
    return load * capacity


def measure_one(name: str, gpus: int, requests: int, load: float, seed: int) -> dict[str, Any]:
    wf = workflow(name)
    ctx = Context.prepare(wf, "H100-SXM", gpus, warmup_requests=50)
    plan = SYSTEMS["static"](ctx, gpus, 1.0)
    rate = stable_rate(ctx, gpus, load)
    arrivals = poisson(rate, requests, seed)
    started = time.perf_counter()
    result = ctx.serve(plan, arrivals)
    wall = time.perf_counter() - started
    return {
        "workflow": name,
        "gpus": gpus,
        "requests": requests,
        "rate": rate,
        "calls": result.calls,
        "iterations": result.iterations,
        "simulated_s": result.end,
        "wall_s": wall,
        "calls_per_s": result.calls / wall,
        "mean_latency_s": float(result.latency.mean()),
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--gpus", type=int, default=16)
    parser.add_argument("--requests", type=int, default=1000)
    parser.add_argument("--load", type=float, default=0.7, help="share of the busiest LLM")
    parser.add_argument("--workflows", default=",".join(sorted(WORKFLOWS)))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    try:
        rows = [
            measure_one(name, args.gpus, args.requests, args.load, args.seed)
            for name in args.workflows.split(",")
        ]
    except ScepsyError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps({"runs": rows}))
        return 0
    print(
        f"{'workflow':10} {'GPUs':>4} {'requests':>8} {'req/s':>7} {'LLM calls':>10} "
        f"{'iterations':>11} {'simulated s':>11} {'wall s':>7} {'calls/s':>9}"
    )
    for r in rows:
        print(
            f"{r['workflow']:10} {r['gpus']:>4} {r['requests']:>8} {r['rate']:>7.3g} "
            f"{r['calls']:>10} {r['iterations']:>11} {r['simulated_s']:>11.1f} "
            f"{r['wall_s']:>7.2f} {r['calls_per_s']:>9,.0f}"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
