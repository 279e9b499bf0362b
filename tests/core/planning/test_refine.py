"""Ranked candidates of the closed form and refinement by a score (simulation stands behind it).

The ranking is checked against brute force (the optimum first, the exact second best second,
rising objectives, each entry's objective its prediction's); refinement's selection rule with
scores given by hand (a test double for the simulator: the rule is what is under test; the
simulator-backed scorer is exercised in tests/core/sim/test_replay.py).
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Mapping

import pytest

from services.core.allocation import Allocation
from services.core.errors import InvalidInputError
from services.core.planning.alp import predict
from services.core.planning.refine import Refiner, Scored, Trial, refine, score_trials
from services.core.planning.search import ranked, search, weighted_latency
from services.core.planning.space import Problem
from tests.core.planning.test_search import (
    MODELS,
    every_allocation,
    serial,
    staged,
    synthetic,
)


def all_objectives(problem: Problem) -> list[float]:
    """Brute force: the weighted latency of every feasible allocation, sorted."""
    values = []
    for alloc in every_allocation(problem, sorted(problem.loads)):
        p = predict(problem.workflows, synthetic, alloc, problem.rates, rho=problem.rho)
        if p.feasible:
            values.append(weighted_latency(problem, p))
    return sorted(values)


@pytest.mark.parametrize("seed", range(4))
def test_ranked_starts_with_the_optimum_then_real_allocations_by_rising_objective(
    seed: int,
) -> None:
    rng = random.Random(seed)
    models = rng.sample(sorted(MODELS), 2 + seed % 2)
    stages = [[m] for m in models] if seed < 2 else [models[:2], models[2:]]
    n = {m: rng.choice([0.5, 1.0, 2.0]) for m in models}
    problem = Problem(
        (staged("w", [s for s in stages if s], n, tool=0.1),),
        {"w": rng.uniform(0.2, 0.8)},
        gpus=3,
        fraction_unit=2,
        max_tp=2,
    )
    found = ranked(problem, synthetic, 5)
    expected = all_objectives(problem)
    assert found[0][0] == pytest.approx(search(problem, synthetic).objective, rel=1e-12)
    assert found[0][0] == pytest.approx(expected[0], rel=1e-9)
    # later entries are real allocations (each objective is one of the brute force's) no
    # better than the second best
    assert 2 <= len(found) <= 5
    assert found[1][0] >= expected[1] - 1e-9
    for value, _ in found:
        assert min(abs(value - e) for e in expected) <= 1e-9 * value
    values = [v for v, _ in found]
    assert values == sorted(values)
    allocations = [a for _, a in found]
    assert all(a != b for i, a in enumerate(allocations) for b in allocations[i + 1 :])
    for value, alloc in found:
        p = predict(problem.workflows, synthetic, alloc, problem.rates, rho=problem.rho)
        assert p.feasible, p.reason
        assert weighted_latency(problem, p) == pytest.approx(value, rel=1e-9)


def problem_two() -> Problem:
    return Problem(
        (serial("w", ("A", 2, 1), ("B", 3, 1)),), {"w": 0.5}, gpus=4, fraction_unit=2, max_tp=2
    )


def scorer(table: Mapping[str, Scored], default: Scored) -> tuple[list[str], Refiner]:
    seen: list[str] = []

    def score(alloc: Mapping[str, Allocation]) -> Scored:
        key = describe(alloc)
        seen.append(key)
        return table.get(key, default)

    return seen, Refiner(score, candidates=4, headroom=(1.3,), margin=0.01)


def describe(alloc: Mapping[str, Allocation]) -> str:
    return ",".join(f"{m}:{a.replicas}x{a.tp}x{a.fraction:g}" for m, a in sorted(alloc.items()))


def test_refine_keeps_the_fastest_steady_candidate() -> None:
    problem = problem_two()
    top = ranked(problem, synthetic, 4)
    second = describe(top[1][1])
    seen, refiner = scorer({second: Scored(1.0, 0.5, True)}, Scored(2.0, 0.5, True))
    refined = refine(problem, synthetic, refiner)
    assert describe(refined.chosen.allocation) == second
    assert seen[0] == describe(top[0][1])  # the closed-form optimum is scored first
    assert len(seen) == len(refined.trials) >= 4
    assert len({describe(t.allocation) for t in refined.trials}) == len(refined.trials)


def test_refine_keeps_the_optimum_within_the_margin_and_prefers_steady() -> None:
    problem = problem_two()
    top = ranked(problem, synthetic, 4)
    first, second, third = (describe(a) for _, a in top[:3])
    table = {
        first: Scored(1.005, 0.5, True),  # within 1% of the fastest: kept
        second: Scored(1.0, 0.5, True),
        third: Scored(0.5, 0.3, False),  # faster but falling behind: never preferred
    }
    _, refiner = scorer(table, Scored(3.0, 0.5, True))
    assert describe(refine(problem, synthetic, refiner).chosen.allocation) == first
    table[first] = Scored(1.02, 0.5, True)
    _, refiner = scorer(table, Scored(3.0, 0.5, True))
    assert describe(refine(problem, synthetic, refiner).chosen.allocation) == second


def test_refine_stops_scoring_when_out_of_time() -> None:
    ticks = iter(range(100))
    trials = [Trial({"A": Allocation(1.0, 1, r)}, float(r), f"rank {r}", None) for r in (1, 2, 3)]
    refiner = Refiner(
        lambda a: Scored(1.0 / a["A"].replicas, 1.0, True),
        seconds=0.5,
        minimum=2,
        clock=lambda: float(next(ticks)),
    )
    refined = score_trials(trials, refiner)
    assert [t.scored is not None for t in refined.trials] == [True, True, False]
    assert refined.chosen.allocation["A"].replicas == 2
    assert math.isfinite(refined.chosen.objective)


def test_the_work_budget_not_the_clock_decides_what_is_scored() -> None:
    # each score costs 10 units of work (simulated calls); a budget of 25 scores three of four
    # candidates whatever the clock says, as long as the wall-time cap is not reached
    trials = [
        Trial({"A": Allocation(1.0, 1, r)}, float(r), f"rank {r}", None) for r in (1, 2, 3, 4)
    ]

    def scored_with(clock: Callable[[], float], seconds: float) -> list[bool]:
        work = [0.0]

        def score(a: Mapping[str, Allocation]) -> Scored:
            work[0] += 10
            return Scored(1.0 / a["A"].replicas, 1.0, True)

        refiner = Refiner(
            score, seconds=seconds, budget=25, work=lambda: work[0], minimum=2, clock=clock
        )
        refined = score_trials(trials, refiner)
        assert refined.work == 10 * sum(t.scored is not None for t in refined.trials)
        return [t.scored is not None for t in refined.trials]

    ticks = iter(range(0, 10**6, 1000))  # a host 1000 s per reading
    assert scored_with(lambda: 0.0, 1e9) == [True, True, True, False]
    assert scored_with(lambda: float(next(ticks)), 1e9) == [True, True, True, False]
    # the wall-time cap still stops a host far slower than the budget assumes
    assert scored_with(lambda: float(next(ticks)), 500) == [True, True, False, False]


def test_refiner_settings_are_checked() -> None:
    with pytest.raises(InvalidInputError, match="candidates"):
        Refiner(lambda a: Scored(1, 1, True), candidates=0)
    with pytest.raises(InvalidInputError, match="seconds"):
        Refiner(lambda a: Scored(1, 1, True), seconds=0)
    with pytest.raises(InvalidInputError, match="budget 0"):
        Refiner(lambda a: Scored(1, 1, True), budget=0)


def test_a_choice_at_the_edge_of_its_capacity_gives_way_to_one_that_confirms() -> None:
    # replicas 1 is fastest in the short run but does not keep up at the confirmation rate;
    # replicas 2 is next and does; replicas 3 is never asked
    trials = [Trial({"A": Allocation(1.0, 1, r)}, float(r), f"rank {r}", None) for r in (1, 2, 3)]
    asked: list[int] = []

    def confirm(a: Mapping[str, Allocation]) -> Scored:
        asked.append(a["A"].replicas)
        return Scored(1.0, 1.0, a["A"].replicas >= 2)

    def score(a: Mapping[str, Allocation]) -> Scored:
        return Scored(float(a["A"].replicas), 1.0, True)

    refined = score_trials(trials, Refiner(score, confirm=confirm))
    assert refined.chosen.allocation["A"].replicas == 2 and asked == [1, 2]
    assert [t.confirmed for t in refined.trials] == [False, True, None]
    # what a plan walks through: the confirmed one first, the refuted one after the unchecked
    assert [t.allocation["A"].replicas for t in refined.order] == [2, 3, 1]
    # two refuted within the limit: the next steady one, not checked, goes first
    asked.clear()
    refined = score_trials(
        trials, Refiner(score, confirm=lambda a: Scored(9.0, 1.0, False), confirmations=2)
    )
    assert refined.chosen.allocation["A"].replicas == 3
    assert [t.confirmed for t in refined.trials] == [False, False, None]
    # no confirmation asked for: the fastest
    assert score_trials(trials, Refiner(score)).chosen.allocation["A"].replicas == 1
    with pytest.raises(InvalidInputError, match="confirmations"):
        Refiner(score, confirmations=-1)


def test_a_candidate_the_closed_form_rules_out_must_win_by_more_than_its_noise() -> None:
    # the optimum (rank 1) and an extra the closed form says cannot serve (objective inf)
    optimum = Trial({"A": Allocation(1.0, 1, 2)}, 5.0, "rank 1", None)
    second = Trial({"A": Allocation(1.0, 1, 3)}, 6.0, "rank 2", None)
    ruled_out = Trial({"A": Allocation(0.5, 1, 4)}, math.inf, "time shares", None)
    trials = [optimum, ruled_out, second]

    def chosen(table: dict[int, Scored]) -> str:
        refined = score_trials(trials, Refiner(lambda a: table[a["A"].replicas]))
        return refined.chosen.origin

    # 3% faster than the optimum, but its run's standard error is 4%: the optimum stays
    table = {
        2: Scored(10.3, 1.0, True),
        3: Scored(10.2, 1.0, True),
        4: Scored(10.0, 1.0, True, 0.04),
    }
    assert chosen(table) == "rank 1"
    # faster by more than its error: it wins, as any candidate would
    table[4] = Scored(9.0, 1.0, True, 0.04)
    assert chosen(table) == "time shares"
    # with no error known, the margin (1%) still applies: 10.25 x 1.01 > 10.3 / 1.01
    table[4] = Scored(10.25, 1.0, True)
    assert chosen(table) == "rank 1"
    # a finite objective is ranked by its latency alone, whatever its error
    table = {
        2: Scored(10.3, 1.0, True),
        3: Scored(10.0, 1.0, True, 0.2),
        4: Scored(11.0, 1.0, True),
    }
    assert chosen(table) == "rank 2"
