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
        [--cases 5x16,10x64,20x256]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import random
import statistics
import sys
import time
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from functools import partial
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from services.core.allocation import Allocation  # noqa: E402
from services.core.cluster.declared import parse_cluster  # noqa: E402
from services.core.cluster.models import model_spec  # noqa: E402
from services.core.perf.analytic import (  # noqa: E402
    RATE_FRACTIONS,
    REQUESTS_PER_POINT,
    SATURATION_WINDOW,
)
from services.core.perf.backends import AnalyticBackend, clear_cache  # noqa: E402
from services.core.planning.alp import predict  # noqa: E402
from services.core.planning.feedback import search_placed  # noqa: E402
from services.core.planning.plan import placer_for, problem_of  # noqa: E402
from services.core.planning.profiles import (  # noqa: E402
    PARALLEL_MIN_COLD,
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


def cpu_seconds() -> float:
    """CPU time of this process and of its children that have ended (a pool's workers)."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def cold_plan(base: Spec, jobs: int) -> tuple[Spec, SpecProfiles, float, float, float]:
    """The first plan of ``base`` at LOAD of its best throughput with nothing cached: (the
    spec with its rates, its profiles, wall seconds in all, wall seconds of them spent on
    profiles, CPU seconds in all, workers included). With ``jobs`` > 1 the profiles are
    computed by a pool of that many forked processes (``SpecProfiles.prefetch``, the pool's
    start included) when at least ``PARALLEL_MIN_COLD`` of them are cold."""
    clear_cache()
    clear_burst_cache()
    cpu = cpu_seconds()
    started = time.perf_counter()
    profiles = SpecProfiles(base)
    configs = all_configs(base)
    if jobs > 1 and len(profiles.cold(configs)) >= PARALLEL_MIN_COLD:
        with ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("fork")) as pool:
            profiles.prefetch(configs, partial(pool.map, chunksize=4))
    scale = best_scale(problem_of(base), profiles.profile) * LOAD
    spec = with_rates(base, scale)
    placer = placer_for(spec.nodes, K)
    search_placed(problem_of(spec), profiles.profile, placer, bursts=profiles.burst)
    wall = time.perf_counter() - started
    return spec, profiles, wall, profiles.seconds, cpu_seconds() - cpu


def run_case(llms: int, gpus: int, repeat: int, jobs: int, check: bool) -> dict[str, Any]:
    base = synthetic_spec(llms, gpus)
    spec, profiles, cold, cold_profiles, cold_cpu = cold_plan(base, 1)
    parallel = cold_plan(base, jobs) if jobs > 1 else None
    problem = problem_of(spec)
    placer = placer_for(spec.nodes, K)
    memory = {p.key: p for p in profiles.known()}
    searches, placed_runs, replans, replan_cpus = [], [], [], []
    for _ in range(repeat):
        # a re-plan: a new profile source over the stored profiles, as the planner makes one
        c0 = time.process_time()
        t0 = time.perf_counter()
        again = SpecProfiles(spec, StoreFirst(get=memory.get))
        placed = search_placed(problem, again.profile, placer, bursts=again.burst)
        t1 = time.perf_counter()
        replan_cpus.append(time.process_time() - c0)
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
        "cold_cpu_seconds": cold_cpu,
        "cold_parallel_seconds": None if parallel is None else parallel[2],
        "cold_parallel_cpu_seconds": None if parallel is None else parallel[4],
        "jobs": jobs,
        "warm_replan_seconds": statistics.median(replans),
        "warm_replan_cpu_seconds": statistics.median(replan_cpus),
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
        StoreFirst(
            {"analytic": AnalyticBackend(RATE_FRACTIONS, REQUESTS_PER_POINT, SATURATION_WINDOW)}
        ),
    )
    problem = problem_of(spec)
    best = search(problem, full.profile, bursts=full.burst)
    found = predict(problem.workflows, full.profile, allocation, problem.rates, bursts=full.burst)
    return weighted_latency(problem, found) / best.objective - 1


def print_table(rows: list[dict[str, Any]]) -> None:
    def opt(value: float | None, digits: int) -> str:
        return "-" if value is None else f"{value:.{digits}f}"

    print(
        f"{'LLMs':>4} {'GPUs':>4} {'wfs':>3} {'profiles':>8} {'profile s':>9} {'cold s':>7} "
        f"{'cpu':>5} {'cold ||':>7} {'cpu':>5} {'replan s':>8} {'cpu':>6} {'search s':>9} "
        f"{'+place s':>9} {'rounds':>6} {'cands':>6} {'front':>5} {'used':>5} {'latency s':>9} "
        f"{'vs full':>7}"
    )
    for r in rows:
        loss = r["objective_vs_full"]
        print(
            f"{r['llms']:>4} {r['gpus']:>4} {r['workflows']:>3} {r['profiles']:>8} "
            f"{r['profile_seconds']:>9.2f} {r['cold_seconds']:>7.2f} {r['cold_cpu_seconds']:>5.2f} "
            f"{opt(r['cold_parallel_seconds'], 2):>7} {opt(r['cold_parallel_cpu_seconds'], 2):>5} "
            f"{r['warm_replan_seconds']:>8.4f} {r['warm_replan_cpu_seconds']:>6.4f} "
            f"{r['search_seconds']:>9.4f} {r['search_placed_seconds']:>9.4f} {r['rounds']:>6} "
            f"{r['candidates']:>6} {r['frontier']:>5} {r['gpus_used']:>5g} {r['latency_s']:>9.3f} "
            f"{'-' if loss is None else f'{loss:+.2%}':>7}"
        )
    print(
        "cold: first plan, nothing cached, wall s and CPU s (profiles computed serially; || with "
        "a pool of --jobs processes, their CPU included); replan: a new profile source over the "
        "stored profiles, search and placement (median wall s, CPU s); vs full: the plan's "
        "objective under full-resolution profiles against their optimum"
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
    parser.add_argument(
        "--cases",
        default=",".join(f"{llms}x{gpus}" for llms, gpus in CASES),
        help="LLMSxGPUS,... (default: %(default)s)",
    )
    args = parser.parse_args(argv)
    cases = [tuple(int(x) for x in c.split("x")) for c in args.cases.split(",")]
    rows = [
        run_case(llms, gpus, max(1, args.repeat), args.jobs, not args.no_check)
        for llms, gpus in cases
    ]
    if args.json:
        print(json.dumps({"k": K, "rho": RHO, "cases": rows}, indent=1))
    else:
        print_table(rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
