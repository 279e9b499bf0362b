"""Search time of the allocation search at 5, 10 and 20 LLMs (16, 64 and 256 H100 GPUs).

Each case is a synthetic deployment: catalogue models (from 0.5B to 70B parameters) under
deployment names, and workflows calling 3 or 4 of them each, some pairs in parallel stages,
some LLMs shared by two workflows, with per-LLM call counts and token lengths drawn from a fixed
seed. The target rates are set to half the best throughput the cluster reaches at that mix, so
the cluster is neither idle nor saturated. Every case is searched with k = 4 (quarter GPUs)
and rho = 0.9 on 8-GPU NVSwitch nodes.

Reported per case: profiles computed (analytic backend at the planning resolution, one per
(model, TP, fraction)) and their time; the cold plan (nothing cached: profiles, burst tables,
search and placement), serially and with the profiles computed by a pool of ``--jobs``
processes; the warm re-plan (a new profile source over the stored profiles, as the planner
makes one per plan: search and placement with its feedback loop); the median over ``--repeat``
runs of the search alone and of search plus placement with every profile at hand; and the
objective check: the plan's weighted latency under full-resolution profiles against the
full-resolution optimum (the price of the cheaper profiles; target within 1%).

    .venv/bin/python scripts/bench_search.py [--repeat N] [--jobs N] [--no-check] [--json]
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from services.core.allocation import Allocation  # noqa: E402
from services.core.cluster.declared import parse_cluster  # noqa: E402
from services.core.cluster.models import model_spec  # noqa: E402
from services.core.perf.analytic import RATE_FRACTIONS, REQUESTS_PER_POINT  # noqa: E402
from services.core.perf.backends import AnalyticBackend, clear_cache  # noqa: E402
from services.core.planning.alp import predict  # noqa: E402
from services.core.planning.feedback import search_placed  # noqa: E402
from services.core.planning.plan import placer_for, problem_of  # noqa: E402
from services.core.planning.profiles import (  # noqa: E402
    SpecProfiles,
    StoreFirst,
    clear_burst_cache,
)
from services.core.planning.search import best_scale, search, weighted_latency  # noqa: E402
from services.core.planning.space import Constraints, configurations  # noqa: E402
from services.core.workload.demand import LlmDemand, WorkflowDemand  # noqa: E402
from services.core.workload.spec import Spec, WorkflowTarget  # noqa: E402

CASES = ((5, 16), (10, 64), (20, 256))  # (LLMs, GPUs)
ARCHITECTURES = (
    "meta-llama/Llama-3.1-8B",
    "Qwen/Qwen3-Reranker-4B",
    "Qwen/Qwen2.5-1.5B",
    "meta-llama/Llama-3.2-3B",
    "Qwen/Qwen3-14B",
    "RLHFlow/Llama3.1-8B-PRM-Deepseek-Data",
    "Qwen/Qwen2.5-0.5B",
    "Qwen/Qwen2.5-32B",
    "mistralai/Mistral-7B-v0.1",
    "meta-llama/Llama-3.1-70B",
)
K = 4
RHO = 0.9
LOAD = 0.5  # target rates as a share of the best throughput the cluster reaches


def synthetic_spec(llms: int, gpus: int, seed: int = 0) -> Spec:
    """``llms`` deployments on ``gpus`` H100s; about one workflow per 2.5 LLMs (module doc)."""
    rng = random.Random(seed)
    names = [
        f"m{i:02d}-{ARCHITECTURES[i % len(ARCHITECTURES)].split('/')[-1]}" for i in range(llms)
    ]
    models = {n: model_spec(ARCHITECTURES[i % len(ARCHITECTURES)]) for i, n in enumerate(names)}
    mixes = {n: ((rng.choice([200, 800, 2000]), rng.choice([1, 50, 200])),) for n in names}
    workflows = []
    count = max(2, round(llms / 2.5))
    for w in range(count):
        # consecutive windows of the models, overlapping by one: neighbours share an LLM
        start = (w * llms) // count
        chosen = [names[(start + j) % llms] for j in range(rng.choice([3, 4]))]
        stages = (
            [tuple(chosen[:2]), *((m,) for m in chosen[2:])]
            if rng.random() < 0.5
            else [(m,) for m in chosen]
        )
        demand = WorkflowDemand(
            f"w{w}",
            tuple(LlmDemand(m, rng.choice([1, 2, 4, 8]), rng.choice([1, 1, 2])) for m in chosen),
            tool_time=rng.uniform(0, 0.5),
            stages=tuple(stages),
        )
        target = WorkflowTarget(
            demand.name, 1.0, 1.0, demand, {m: mixes[m] for m in chosen}, "synthetic"
        )
        workflows.append(target)
    doc = {
        "version": 1,
        "nodes": [
            {"name": "h100", "gpu_type": "H100-SXM", "gpus": 8, "count": gpus // 8,
             "interconnect": "nvswitch"}
        ],
    }  # fmt: skip
    return Spec(tuple(workflows), models, parse_cluster(doc), K, RHO)


def with_rates(spec: Spec, scale: float) -> Spec:
    targets = tuple(
        WorkflowTarget(w.name, w.rate * scale, w.weight, w.demand, w.mixes, w.source)
        for w in spec.workflows
    )
    return Spec(targets, spec.models, spec.nodes, spec.fraction_unit, spec.rho)


def all_configs(spec: Spec) -> list[tuple[str, int, float]]:
    """Every (model, tp, fraction) the search asks about for ``spec``."""
    problem = problem_of(spec)
    return [
        (m, tp, units / K)
        for m in sorted(problem.loads)
        for tp, units in configurations(problem, Constraints())
    ]


def cold_plan(base: Spec, jobs: int) -> tuple[Spec, SpecProfiles, float, float]:
    """The first plan of ``base`` at LOAD of its best throughput with nothing cached: (the
    spec with its rates, its profiles, seconds in all, seconds of them spent on profiles)."""
    clear_cache()
    clear_burst_cache()
    started = time.perf_counter()
    profiles = SpecProfiles(base)
    if jobs > 1:
        with ProcessPoolExecutor(jobs) as pool:
            profiles.prefetch(all_configs(base), pool.map)
    scale = best_scale(problem_of(base), profiles.profile) * LOAD
    spec = with_rates(base, scale)
    placer = placer_for(spec.nodes, K)
    search_placed(problem_of(spec), profiles.profile, placer, bursts=profiles.burst)
    return spec, profiles, time.perf_counter() - started, profiles.seconds


def run_case(llms: int, gpus: int, repeat: int, jobs: int, check: bool) -> dict[str, Any]:
    base = synthetic_spec(llms, gpus)
    spec, profiles, cold, cold_profiles = cold_plan(base, 1)
    cold_parallel = cold_plan(base, jobs)[2] if jobs > 1 else None
    problem = problem_of(spec)
    placer = placer_for(spec.nodes, K)
    memory = {p.key: p for p in profiles.known()}
    searches, placed_runs, replans = [], [], []
    for _ in range(repeat):
        # a re-plan: a new profile source over the stored profiles, as the planner makes one
        t0 = time.perf_counter()
        again = SpecProfiles(spec, StoreFirst(get=memory.get))
        placed = search_placed(problem, again.profile, placer, bursts=again.burst)
        t1 = time.perf_counter()
        result = search(problem, profiles.profile, bursts=profiles.burst)
        t2 = time.perf_counter()
        search_placed(problem, profiles.profile, placer, bursts=profiles.burst)
        placed_runs.append(time.perf_counter() - t2)
        searches.append(t2 - t1)
        replans.append(t1 - t0)
    row: dict[str, Any] = {
        "llms": llms,
        "gpus": gpus,
        "workflows": len(spec.workflows),
        "components": result.components,
        "profiles": profiles.computed,
        "profile_seconds": cold_profiles,
        "cold_seconds": cold,
        "cold_parallel_seconds": cold_parallel,
        "jobs": jobs,
        "warm_replan_seconds": statistics.median(replans),
        "search_seconds": statistics.median(searches),
        "search_placed_seconds": statistics.median(placed_runs),
        "rounds": placed.rounds,
        "candidates": result.candidates,
        "frontier": result.frontier,
        "gpus_used": result.units / K,
        "latency_s": placed.result.objective,
        "objective_vs_full": None,
    }
    if check:
        row["objective_vs_full"] = objective_loss(spec, placed.result.allocation)
    return row


def objective_loss(spec: Spec, allocation: dict[str, Allocation]) -> float:
    """How much worse, under full-resolution profiles (``analytic.RATE_FRACTIONS``, 400 calls a
    point), the allocation found with planning profiles is than the full-resolution optimum:
    J(found) / J(optimum) - 1."""
    full = SpecProfiles(
        spec,
        StoreFirst({"analytic": AnalyticBackend(RATE_FRACTIONS, REQUESTS_PER_POINT)}),
    )
    problem = problem_of(spec)
    best = search(problem, full.profile, bursts=full.burst)
    found = predict(problem.workflows, full.profile, allocation, problem.rates, bursts=full.burst)
    return weighted_latency(problem, found) / best.objective - 1


def print_table(rows: list[dict[str, Any]]) -> None:
    print(
        f"{'LLMs':>4} {'GPUs':>4} {'wfs':>3} {'profiles':>8} {'profile s':>9} {'cold s':>7} "
        f"{'cold ||':>7} {'replan s':>8} {'search s':>9} {'+place s':>9} {'rounds':>6} "
        f"{'cands':>6} {'front':>5} {'used':>5} {'latency s':>9} {'vs full':>7}"
    )
    for r in rows:
        par = r["cold_parallel_seconds"]
        loss = r["objective_vs_full"]
        print(
            f"{r['llms']:>4} {r['gpus']:>4} {r['workflows']:>3} {r['profiles']:>8} "
            f"{r['profile_seconds']:>9.2f} {r['cold_seconds']:>7.2f} "
            f"{'-' if par is None else f'{par:.2f}':>7} {r['warm_replan_seconds']:>8.4f} "
            f"{r['search_seconds']:>9.4f} {r['search_placed_seconds']:>9.4f} {r['rounds']:>6} "
            f"{r['candidates']:>6} {r['frontier']:>5} {r['gpus_used']:>5g} {r['latency_s']:>9.3f} "
            f"{'-' if loss is None else f'{loss:+.2%}':>7}"
        )
    print(
        "cold: first plan, nothing cached (profiles computed serially; || with a process pool "
        "of --jobs); replan: a new profile source over the stored profiles, search and placement; "
        "vs full: the plan's objective under full-resolution profiles against their optimum"
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeat", type=int, default=5, help="warm runs per case (median)")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    parser.add_argument("--jobs", type=int, default=2, help="processes for the parallel cold plan")
    parser.add_argument(
        "--no-check",
        action="store_true",
        help="skip the objective check (full-resolution profiles)",
    )
    args = parser.parse_args(argv)
    rows = [
        run_case(llms, gpus, max(1, args.repeat), args.jobs, not args.no_check)
        for llms, gpus in CASES
    ]
    if args.json:
        print(json.dumps({"k": K, "rho": RHO, "cases": rows}, indent=1))
    else:
        print_table(rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
