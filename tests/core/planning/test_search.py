"""The allocation search against brute-force enumeration of every allocation.

Profiles are built by hand (``synthetic``) so the search logic is what is under test: an
instance on ``tp`` GPUs x ``fraction`` saturates at ``base_rate x speedup`` and is
``base_latency / speedup**0.5`` fast when idle, latency tripling towards saturation.
"""

from __future__ import annotations

import itertools
import math
import random
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import replace

import pytest

from services.core.allocation import Allocation
from services.core.cluster.declared import parse_cluster
from services.core.errors import InfeasibleError
from services.core.perf.profile import Profile, ProfileKey, ProfilePoint
from services.core.placement.heuristic import (
    InfeasibleKind,
    Placement,
    PlacementInfeasible,
    cluster_state,
    instances_of,
    place,
)
from services.core.planning.alp import BurstTable, FitCheck, predict
from services.core.planning.feedback import PlaceFn, search_placed
from services.core.planning.search import (
    AllocationInfeasible,
    Component,
    Stage,
    best_scale,
    component_frontier,
    knapsack,
    search,
    weighted_latency,
)
from services.core.planning.space import Candidate, Constraints, Problem, pareto
from services.core.workload.demand import LlmDemand, WorkflowDemand

# model -> (idle latency s at one whole GPU, saturation calls/s at one whole GPU, TP efficiency)
MODELS = {
    "A": (1.0, 4.0, 0.9),
    "B": (0.4, 10.0, 0.7),
    "C": (2.0, 2.0, 0.95),
    "D": (0.2, 20.0, 0.6),
}


def synthetic(model: str, tp: int, fraction: float) -> Profile:
    idle, rate, efficiency = MODELS[model]
    speedup = fraction if tp == 1 else tp**efficiency
    saturation = rate * speedup
    latency = idle / speedup**0.5
    key = ProfileKey(model, "test", tp, fraction, "test", "mix")
    points = tuple(
        ProfilePoint(saturation * share, latency * factor, latency, latency, 0.0, 0.0)
        for share, factor in ((0.1, 1.0), (0.5, 1.5), (0.9, 3.0))
    )
    return Profile(key, points, saturation)


def serial(name: str, *llms: tuple[str, float, float], tool: float = 0.0) -> WorkflowDemand:
    return WorkflowDemand(name, tuple(LlmDemand(m, n, p) for m, n, p in llms), tool)


def staged(
    name: str, stages: Sequence[Sequence[str]], n: Mapping[str, float], tool: float = 0.0
) -> WorkflowDemand:
    llms = tuple(LlmDemand(m, n[m], 1.0) for stage in stages for m in stage)
    return WorkflowDemand(name, llms, tool, tuple(tuple(s) for s in stages))


# ------------------------------------------------------------------------------ brute force
def every_allocation(problem: Problem, models: Sequence[str]) -> Iterator[dict[str, Allocation]]:
    """Every allocation of ``models`` within the GPUs: all (tp, fraction, replicas) combinations."""
    k = problem.fraction_unit
    configs = [(1, u) for u in range(1, k + 1)] + [(t, k) for t in (2, 4, 8) if t <= problem.max_tp]
    options = [
        (tp * u * r, Allocation(u / k, tp, r))
        for tp, u in configs
        for r in range(1, problem.budget // (tp * u) + 1)
    ]
    for combo in itertools.product(options, repeat=len(models)):
        if sum(cost for cost, _ in combo) <= problem.budget:
            yield {m: a for m, (_, a) in zip(models, combo, strict=True)}


def brute_force(
    problem: Problem,
    fits: FitCheck | None = None,
    allowed: Callable[[dict[str, Allocation]], bool] | None = None,
) -> tuple[float, dict[str, Allocation] | None]:
    """The lowest weighted latency of any feasible (and ``allowed``) allocation, and one."""
    models = sorted(problem.loads)
    best: tuple[float, dict[str, Allocation] | None] = (math.inf, None)
    for alloc in every_allocation(problem, models):
        if allowed is not None and not allowed(alloc):
            continue
        p = predict(problem.workflows, synthetic, alloc, problem.rates, fits=fits, rho=problem.rho)
        if p.feasible:
            value = weighted_latency(problem, p)
            if value < best[0]:
                best = (value, alloc)
    return best


def max_throughput_scale(problem: Problem) -> float:
    """Brute force: the largest common throughput scale s of any allocation within the GPUs."""
    models = sorted(problem.loads)
    best = 0.0
    for alloc in every_allocation(problem, models):
        p = predict(problem.workflows, synthetic, alloc, problem.rates)
        w = problem.workflows[0].name
        best = max(best, p.workflow(w).throughput / problem.rates[w])
    return best


def check_optimal(problem: Problem, fits: FitCheck | None = None) -> None:
    result = search(problem, synthetic, fits=fits)
    expected, alloc = brute_force(problem, fits)
    assert alloc is not None
    assert result.prediction.feasible, result.prediction.reason
    assert result.objective == pytest.approx(expected, rel=1e-9)
    assert weighted_latency(problem, result.prediction) == pytest.approx(expected, rel=1e-9)
    assert result.units <= problem.budget


# ------------------------------------------------------------------------------ optimality
def test_three_serial_llms_on_four_gpus_k4() -> None:
    problem = Problem(
        (serial("w", ("A", 2, 1), ("B", 3, 1.5), ("C", 1, 1), tool=0.3),),
        {"w": 1.0},
        gpus=4,
        fraction_unit=4,
        max_tp=4,
    )
    check_optimal(problem)


def test_parallel_stage_is_composed_by_max() -> None:
    # A and B overlap inside a request: the stage costs max(term A, term B), so the search may
    # leave the shorter one slow (cheap) for free; the brute force sees the same.
    problem = Problem(
        (staged("w", [["A", "B"], ["C"]], {"A": 2, "B": 3, "C": 1}, tool=0.1),),
        {"w": 1.0},
        gpus=4,
        max_tp=4,
    )
    check_optimal(problem)


def test_shared_llms_across_workflows_with_different_stages() -> None:
    # B is shared; w1 runs A||B then C, w2 runs B||C: one component {A, B, C} with two stages
    # open at once while it is combined, and weights 2:1.
    w1 = staged("w1", [["A", "B"], ["C"]], {"A": 1, "B": 2, "C": 1}, tool=0.2)
    w2 = staged("w2", [["B", "C"]], {"B": 1, "C": 2})
    problem = Problem((w1, w2), {"w1": 0.8, "w2": 0.5}, gpus=4, max_tp=4, weights={"w1": 2.0})
    check_optimal(problem)
    result = search(problem, synthetic)
    # the shared LLM carries both loads: 0.8 x 2 + 0.5 x 1
    assert result.prediction.llm("B").load == pytest.approx(2.1)
    assert result.components == 1


def test_four_llms_two_workflows_k2_on_three_gpus() -> None:
    w1 = serial("w1", ("A", 1, 1), ("B", 2, 1))
    w2 = staged("w2", [["C", "D"], ["B"]], {"B": 1, "C": 1, "D": 3})
    problem = Problem((w1, w2), {"w1": 0.6, "w2": 0.4}, gpus=3, fraction_unit=2, max_tp=2)
    check_optimal(problem)


@pytest.mark.parametrize("seed", range(8))
def test_random_instances_match_brute_force(seed: int) -> None:
    rng = random.Random(seed)
    models = rng.sample(sorted(MODELS), 3)
    order = models[:]
    rng.shuffle(order)
    cut = rng.randrange(1, 3)
    stages = [order[:cut], order[cut:]] if rng.random() < 0.6 else [[m] for m in order]
    n = {m: rng.choice([0.5, 1.0, 2.0, 3.0]) for m in models}
    w1 = staged("w1", stages, n, tool=rng.random())
    workflows = [w1]
    if seed % 2:
        pair = rng.sample(models, 2)
        workflows.append(staged("w2", [pair], {m: rng.choice([1.0, 2.0]) for m in pair}))
    rates = {w.name: rng.uniform(0.2, 1.0) for w in workflows}
    k = rng.choice([2, 4])
    problem = Problem(
        tuple(workflows),
        rates,
        gpus=3 if k == 2 else 2,
        fraction_unit=k,
        max_tp=2,
        rho=rng.choice([0.8, 1.0]),
        weights={"w1": rng.uniform(0.5, 2.0)},
    )
    try:
        check_optimal(problem)
    except AllocationInfeasible:
        assert brute_force(problem)[1] is None


def test_returns_the_cheapest_of_equally_fast_allocations() -> None:
    # Far below saturation every replica count gives the idle latency: one replica is enough,
    # and tp 2 is faster only through the idle latency, which the search must buy.
    problem = Problem((serial("w", ("D", 1, 1)),), {"w": 0.1}, gpus=2, fraction_unit=4, max_tp=1)
    result = search(problem, synthetic)
    assert result.allocation == {"D": Allocation(1.0, 1, 1)}
    assert result.units == 4


# ------------------------------------------------------------------------------ constraints
def no_small_shares(model: str, tp: int, fraction: float) -> str | None:
    """C needs two GPUs (its weights); A needs at least half a GPU."""
    if model == "C" and tp < 2:
        return "weights do not fit one GPU"
    if model == "A" and fraction < 0.5:
        return "weights do not fit a quarter GPU"
    return None


def test_memory_rho_gpus_and_tp_are_respected() -> None:
    problem = Problem(
        (serial("w", ("A", 2, 1), ("C", 1, 1), ("B", 1, 1)),),
        {"w": 1.5},
        gpus=4,
        max_tp=2,
        rho=0.7,
    )
    check_optimal(problem, fits=no_small_shares)
    result = search(problem, synthetic, fits=no_small_shares)
    assert result.allocation["C"].tp == 2
    assert result.allocation["A"].fraction >= 0.5
    assert all(a.tp <= 2 for a in result.allocation.values())
    assert all(m.utilization <= 0.7 for m in result.prediction.llms)
    assert result.prediction.gpus <= 4


def test_replica_caps_and_unit_caps() -> None:
    problem = Problem((serial("w", ("A", 2, 1), ("B", 1, 1)),), {"w": 1.0}, gpus=4, max_tp=4)
    free = search(problem, synthetic)
    a = free.allocation["A"]
    config = ("A", a.tp, round(a.fraction * 4))
    capped = search(problem, synthetic, constraints=Constraints(max_replicas={config: 0}))
    assert (capped.allocation["A"].tp, capped.allocation["A"].fraction) != (a.tp, a.fraction)
    small = search(problem, synthetic, constraints=Constraints(max_units=free.units - 1))
    assert small.units < free.units
    assert small.objective >= free.objective


# ------------------------------------------------------------------------------ infeasible
def test_too_high_a_rate_says_why_and_the_best_throughput() -> None:
    problem = Problem((serial("w", ("A", 2, 1), ("B", 1, 1)),), {"w": 20.0}, gpus=2, max_tp=2)
    with pytest.raises(AllocationInfeasible) as caught:
        search(problem, synthetic)
    err = caught.value
    assert "needs at least" in str(err) and "GPUs" in str(err)
    assert "best achievable throughput" in str(err)
    # brute force over every allocation of the 2 GPUs: the highest throughput at the target mix
    expected = max_throughput_scale(problem) * 20.0
    assert err.best_throughput["w"] == pytest.approx(expected, rel=1e-6)
    assert isinstance(err, InfeasibleError)


def test_a_model_that_fits_nowhere_is_named() -> None:
    problem = Problem((serial("w", ("C", 1, 1)),), {"w": 0.1}, gpus=4, max_tp=1)
    with pytest.raises(AllocationInfeasible, match=r"C: no configuration fits in memory") as e:
        search(problem, synthetic, fits=no_small_shares)
    assert e.value.best_throughput == {"w": 0.0}


def test_best_scale_is_monotone_in_the_budget() -> None:
    w = (serial("w", ("A", 1, 1), ("B", 2, 1)),)
    scales = [best_scale(Problem(w, {"w": 1.0}, gpus=g, max_tp=2), synthetic) for g in (1, 2, 4)]
    assert scales == sorted(scales) and scales[0] > 0


# ------------------------------------------------------------------------------ pieces
def cand(cost: int, latency: float, model: str = "A") -> Candidate:
    return Candidate(model, 1, cost, 1, cost, latency)


def test_pareto_keeps_cheaper_or_faster() -> None:
    kept = pareto([cand(4, 1.0), cand(2, 2.0), cand(3, 2.0), cand(5, 1.0), cand(6, 0.5)])
    assert [(c.cost, c.latency) for c in kept] == [(2, 2.0), (4, 1.0), (6, 0.5)]


def test_knapsack_picks_the_best_sum_with_fewest_units() -> None:
    # group 1: (1, 5) (3, 2); group 2: (2, 4) (4, 1); budget 6.
    # sums: 1+2 -> 9, 1+4 -> 6, 3+2 -> 6 (5 units), 3+4 -> over budget. Optimum 6 with 5 units.
    value, chosen = knapsack([[(1, 5.0), (3, 2.0)], [(2, 4.0), (4, 1.0)]], 6) or (0, [])
    assert value == 6.0 and chosen == [1, 0]
    assert knapsack([[(4, 1.0)], [(3, 1.0)]], 6) is None


def test_component_frontier_of_a_parallel_stage() -> None:
    # one stage max(2 x lat_A, 1 x lat_B): A (1, 3.0) (2, 1.0); B (1, 4.0) (3, 1.0)
    # (2, max(6, 4) = 6) (3, max(2, 4) = 4) (4, max(6, 1) = 6: dominated) (5, max(2, 1) = 2)
    comp = Component(("A", "B"), (Stage({"A": 2.0, "B": 1.0}),))
    fronts = {"A": [cand(1, 3.0), cand(2, 1.0)], "B": [cand(1, 4.0, "B"), cand(3, 1.0, "B")]}
    points = [(c, v) for c, v, _ in component_frontier(comp, fronts, 10)]
    assert points == [(2, 6.0), (3, 4.0), (5, 2.0)]
    assert [(c, v) for c, v, _ in component_frontier(comp, fronts, 4)] == [(2, 6.0), (3, 4.0)]


# ------------------------------------------------------------------------------ placement
def pcie_placer(gpus: int, k: int, gpu_type: str = "L40S", interconnect: str = "pcie") -> PlaceFn:
    node = {"name": "n", "gpu_type": gpu_type, "gpus": gpus, "interconnect": interconnect}
    nodes = parse_cluster({"version": 1, "nodes": [node]})
    state = cluster_state(nodes, k)
    return lambda allocation: place(instances_of(allocation, k), state)


def places(placer: PlaceFn, allocation: Mapping[str, Allocation]) -> bool:
    try:
        placer(allocation)
    except PlacementInfeasible:
        return False
    return True


def test_placement_feedback_returns_the_best_allocation_that_places() -> None:
    # Unconstrained optimum: A 3/4, B 3/4, D 1/2 = 8 units on 2 GPUs, but the two 3/4 shares
    # leave 1/4 free on each GPU and D's half fits on neither. The best-first branching finds
    # the optimum among the allocations that place (checked by brute force with the placer).
    problem = Problem(
        (serial("w", ("B", 1, 1), ("D", 2, 1), ("A", 0.5, 1)),), {"w": 0.75}, gpus=2, max_tp=1
    )
    placer = pcie_placer(2, 4)
    first = search(problem, synthetic)
    assert not places(placer, first.allocation)
    placed = search_placed(problem, synthetic, placer)
    expected, alloc = brute_force(problem, allowed=lambda a: places(placer, a))
    assert alloc is not None
    assert placed.result.objective == pytest.approx(expected, rel=1e-9)
    assert placed.result.objective > first.objective
    assert placed.rounds > 1
    assert placed.constraints.notes[0].startswith("fractions_do_not_pack: D")
    assert [a.model for a in placed.placement.assignments] == sorted(
        m for m, a in placed.result.allocation.items() for _ in range(a.replicas)
    )


@pytest.mark.parametrize("seed", range(6))
def test_placement_feedback_matches_brute_force(seed: int) -> None:
    rng = random.Random(seed * 7 + 1)
    models = rng.sample(sorted(MODELS), 3)
    llms = [(m, rng.choice([0.5, 1.0, 2.0]), 1.0) for m in models]
    problem = Problem((serial("w", *llms),), {"w": rng.uniform(0.2, 1.5)}, gpus=2, max_tp=1)
    placer = pcie_placer(2, 4)
    expected, alloc = brute_force(problem, allowed=lambda a: places(placer, a))
    if alloc is None:
        with pytest.raises(AllocationInfeasible):
            search_placed(problem, synthetic, placer)
        return
    placed = search_placed(problem, synthetic, placer)
    assert placed.result.objective == pytest.approx(expected, rel=1e-9)


def test_tp_wider_than_every_domain_caps_the_tp() -> None:
    def narrow(allocation: Mapping[str, Allocation]) -> Placement:
        widest = max(allocation.items(), key=lambda item: item[1].tp)
        if widest[1].tp > 2:
            raise PlacementInfeasible(
                InfeasibleKind.TP_EXCEEDS_DOMAIN,
                "too wide",
                model=widest[0],
                needed=4,
                available=2,
            )
        return pcie_placer(4, 4, "A100-80GB-PCIe", "nvlink-pairs")(allocation)

    problem = Problem((serial("w", ("C", 1, 1)),), {"w": 2.0}, gpus=4, max_tp=4)
    assert search(problem, synthetic).allocation["C"].tp == 4
    placed = search_placed(problem, synthetic, narrow)
    assert placed.constraints.max_tp == 2 and placed.rounds == 2
    assert placed.result.allocation["C"].tp <= 2


def test_nothing_places() -> None:
    def refuse(allocation: Mapping[str, Allocation]) -> Placement:
        (model,) = allocation
        raise PlacementInfeasible(InfeasibleKind.FRACTIONS_DO_NOT_PACK, "no", model=model)

    problem = Problem((serial("w", ("D", 1, 1)),), {"w": 1.0}, gpus=1, max_tp=1)
    with pytest.raises(AllocationInfeasible, match="no allocation that meets the constraints"):
        search_placed(problem, synthetic, refuse)
    with pytest.raises(InfeasibleError, match="after 3 searches"):
        search_placed(problem, synthetic, refuse, max_rounds=3)


# ------------------------------------------------------------------------------ fan-outs
def queued(model: str, tp: int, fraction: float) -> Profile:
    """``synthetic`` with a TTFT that grows with the rate (half the latency), so the pooled
    routing correction has a wait to shrink."""
    base = synthetic(model, tp, fraction)
    points = tuple(
        ProfilePoint(p.rate, p.mean_latency, p.p50_latency, p.p99_latency, p.mean_latency / 2, 0)
        for p in base.points
    )
    return Profile(base.key, points, base.saturation_rate)


def burst_table(model: str, tp: int, fraction: float) -> BurstTable:
    """Calls handed over together share an instance: b of them take (1 + 0.2 (b - 1)) x."""
    idle = queued(model, tp, fraction).points[0].mean_latency
    sizes = (1, 2, 4, 8)
    return BurstTable.of([(b, idle * (1 + 0.2 * (b - 1))) for b in sizes])


@pytest.mark.parametrize("seed", range(6))
def test_fan_outs_match_brute_force(seed: int) -> None:
    # LLMs called in fan-outs of p (shared ones with different p per workflow): the search with
    # the burst and pooling corrections is still exactly optimal for the ALP that has them.
    rng = random.Random(100 + seed)
    models = rng.sample(sorted(MODELS), 3)
    w1 = serial("w1", *((m, rng.choice([2.0, 4.0]), rng.choice([1.0, 2.0, 3.5])) for m in models))
    pair = rng.sample(models, 2)
    w2 = serial("w2", *((m, 2.0, rng.choice([1.0, 4.0])) for m in pair))
    problem = Problem(
        (w1, w2), {"w1": rng.uniform(0.1, 0.4), "w2": 0.2}, gpus=3, fraction_unit=2, max_tp=2
    )
    result = search(problem, queued, bursts=burst_table)
    best = math.inf
    for alloc in every_allocation(problem, sorted(problem.loads)):
        p = predict(
            problem.workflows, queued, alloc, problem.rates, rho=problem.rho, bursts=burst_table
        )
        if p.feasible:
            best = min(best, weighted_latency(problem, p))
    assert result.objective == pytest.approx(best, rel=1e-9)
    assert weighted_latency(problem, result.prediction) == pytest.approx(best, rel=1e-9)


def test_a_fan_out_on_one_replica_costs_more_than_spread() -> None:
    # a fan-out of 4 calls to one replica shares its iterations; spread over four replicas each
    # call is alone: with bursts the single replica falls further behind than without
    one = {"B": Allocation(1.0, 1, 1)}
    four = {"B": Allocation(1.0, 1, 4)}
    w = serial("w", ("B", 4.0, 4.0))
    rates = {"w": 0.5}
    with_bursts = [
        predict([w], queued, a, rates, bursts=burst_table).workflow("w").latency
        for a in (one, four)
    ]
    plain = [predict([w], queued, a, rates).workflow("w").latency for a in (one, four)]
    assert with_bursts[0] - with_bursts[1] > plain[0] - plain[1] > 0
    # spread over 4 replicas a fan-out of 4 is one call each: no burst term there
    assert with_bursts[1] <= plain[1]


# ------------------------------------------------------------------------------ fewest GPUs
@pytest.mark.parametrize("seed", range(4))
def test_fewest_gpus_under_a_latency_objective_match_brute_force(seed: int) -> None:
    rng = random.Random(200 + seed)
    models = rng.sample(sorted(MODELS), 2)
    w = serial("w", *((m, rng.choice([1.0, 2.0]), 1.0) for m in models), tool=0.1)
    base = Problem((w,), {"w": rng.uniform(0.2, 0.6)}, gpus=3, fraction_unit=2, max_tp=2)
    fastest = search(base, synthetic).objective
    slo = fastest * rng.choice([1.05, 1.3, 2.0])
    problem = replace(base, latency_slo=slo)
    result = search(problem, synthetic)
    k = problem.fraction_unit
    options = []
    for alloc in every_allocation(problem, sorted(problem.loads)):
        p = predict(problem.workflows, synthetic, alloc, problem.rates, rho=problem.rho)
        value = weighted_latency(problem, p) if p.feasible else math.inf
        if value <= slo:
            options.append((round(sum(a.gpus for a in alloc.values()) * k), value))
    fewest = min(units for units, _ in options)
    assert result.units == fewest
    assert result.objective == pytest.approx(min(v for u, v in options if u == fewest), rel=1e-9)
    assert result.objective <= slo
    with pytest.raises(AllocationInfeasible, match="latency objective"):
        search(replace(base, latency_slo=fastest * 0.5), synthetic)
