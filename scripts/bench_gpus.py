"""GPUs needed at equal latency: Scepsy's fewest-GPUs objective against the baselines, simulated.

For every workflow on ``--gpus`` GPUs at ``--load`` x the ALP's highest throughput there:

- Scepsy's minimum-latency plan (the plan path) and the fewest-GPUs plan whose predicted
  latency is within ``--slack`` of it: GPUs used, predicted and simulated mean latency;
- per baseline (the static even split, the independent per-LLM sizing): its simulated mean
  latency on all the GPUs, then Scepsy's fewest-GPUs plan with that latency as the objective,
  its GPUs and simulated latency (``met``: within 3% of the baseline's, the simulator being
  the judge).

    .venv/bin/python scripts/bench_gpus.py [--workflows rag,beam,...] [--gpus 8] [--load 0.5]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from services.core.allocation import Allocation  # noqa: E402
from services.core.errors import InfeasibleError, ScepsyError  # noqa: E402
from services.core.planning.feedback import search_placed  # noqa: E402
from services.core.planning.plan import placer_for  # noqa: E402
from services.core.sim.results import BenchSettings  # noqa: E402
from services.core.sim.runs import Counter, load_at, run_point  # noqa: E402
from services.core.sim.systems import SYSTEMS, Context, Setup, cluster_nodes  # noqa: E402
from services.core.sim.workflows import WORKFLOWS, workflow  # noqa: E402

SEED = 77
MET = 1.03  # simulated latency within 3% of the objective counts as meeting it


def fewest(ctx: Context, gpus: int, rate: float, slo: float) -> dict[str, Allocation]:
    """The fewest-GPUs allocation with predicted latency <= ``slo`` that places."""
    problem = replace(ctx.problem(gpus, rate), latency_slo=slo)
    placer = placer_for(cluster_nodes(ctx.gpu.name, gpus), ctx.fraction_unit)
    placed = search_placed(problem, ctx.profiles.profile, placer, bursts=ctx.profiles.burst)
    return placed.result.allocation


def measure(name: str, gpus: int, load: float, slack: float) -> list[dict[str, Any]]:
    settings = replace(BenchSettings(), max_calls=30_000)
    ctx = Context.prepare(workflow(name), settings.gpu_type, gpus, warmup_requests=150)
    rate = load * ctx.capacity(gpus)
    arrivals = load_at(ctx, rate, SEED, settings)
    counter = Counter()

    def simulate(setup: Setup) -> tuple[float, float]:
        point = run_point(ctx, setup, arrivals, gpus, settings, counter)
        return point.gpus, point.mean_latency

    rows: list[dict[str, Any]] = []
    best = SYSTEMS["scepsy"](ctx, gpus, rate)
    best_pred = ctx.predict(best.allocation, rate).workflows[0].latency
    best_gpus, best_sim = simulate(best)
    lean = fewest(ctx, gpus, rate, best_pred * (1 + slack))
    lean_gpus, lean_sim = simulate(Setup("scepsy-fewest", lean))
    rows.append(
        {
            "workflow": name,
            "rate": rate,
            "against": f"scepsy min-latency +{slack:.0%}",
            "their_gpus": best_gpus,
            "their_latency": best_sim,
            "scepsy_gpus": lean_gpus,
            "scepsy_predicted": ctx.predict(lean, rate).workflows[0].latency,
            "scepsy_latency": lean_sim,
            "met": lean_sim <= best_sim * (1 + slack) * MET,
        }
    )
    for baseline in ("static", "independent"):
        try:
            their_gpus, their = simulate(SYSTEMS[baseline](ctx, gpus, rate))
            mine = fewest(ctx, gpus, rate, their)
        except InfeasibleError as exc:
            rows.append({"workflow": name, "rate": rate, "against": baseline, "error": str(exc)})
            continue
        my_gpus, my_sim = simulate(Setup("scepsy-fewest", mine))
        rows.append(
            {
                "workflow": name,
                "rate": rate,
                "against": baseline,
                "their_gpus": their_gpus,
                "their_latency": their,
                "scepsy_gpus": my_gpus,
                "scepsy_predicted": ctx.predict(mine, rate).workflows[0].latency,
                "scepsy_latency": my_sim,
                "met": my_sim <= their * MET,
            }
        )
    return rows


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workflows", default=",".join(WORKFLOWS))
    parser.add_argument("--gpus", type=int, default=8)
    parser.add_argument("--load", type=float, default=0.5)
    parser.add_argument("--slack", type=float, default=0.1)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    rows: list[dict[str, Any]] = []
    try:
        for name in args.workflows.split(","):
            rows += measure(name, args.gpus, args.load, args.slack)
    except ScepsyError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps({"rows": rows}))
        return 0
    print(
        f"{'workflow':10} {'req/s':>7} {'against':28} {'GPUs':>5} {'lat s':>7} "
        f"{'scepsy GPUs':>11} {'pred s':>7} {'sim s':>7} {'met':>4}"
    )
    for r in rows:
        if "error" in r:
            print(f"{r['workflow']:10} {r['rate']:>7.3g} {r['against']:28} {r['error']}")
            continue
        print(
            f"{r['workflow']:10} {r['rate']:>7.3g} {r['against']:28} {r['their_gpus']:>5g} "
            f"{r['their_latency']:>7.2f} {r['scepsy_gpus']:>11g} {r['scepsy_predicted']:>7.2f} "
            f"{r['scepsy_latency']:>7.2f} {'yes' if r['met'] else 'no':>4}"
        )
    print(f"\n{args.gpus} GPUs, {time.perf_counter() - started:.1f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
