"""``measure``: the served work of an overloaded run (``work_rate``) against its completion rate;
the steady state of a mix of workflows, part by part."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from services.core.allocation import Allocation
from services.core.cluster.hardware import gpu_spec
from services.core.cluster.models import model_spec
from services.core.errors import InvalidInputError
from services.core.sim.arrivals import poisson
from services.core.sim.measure import MeasureConfig, Point, clear, measure, work_rate
from services.core.sim.program import Llm, Program
from services.core.sim.simulator import Deployment, SimOptions, SimResult, simulate
from services.core.sim.workflows import Mix

H100 = gpu_spec("H100-SXM")
SMALL = model_spec("meta-llama/Llama-3.2-1B")


class Rounds:
    """``rounds`` sequential calls of one LLM per request (a loop with a barrier each round)."""

    name = "rounds"

    def __init__(self, rounds: int) -> None:
        self.rounds = rounds
        self.models = {"a": SMALL.name}

    def program(self, rng: np.random.Generator) -> Program:
        for _ in range(self.rounds):
            yield Llm("a", 400, 60)

    def mean_calls(self) -> dict[str, float]:
        return {"a": float(self.rounds)}


def run(rounds: int, rate: float, requests: int, record: bool = True) -> SimResult:
    deployment = Deployment(H100, {"a": SMALL}, {"a": Allocation(0.25, 1, 1)})
    return simulate(
        Rounds(rounds), deployment, poisson(rate, requests, 3), SimOptions(seed=1, record=record)
    )


def capacity(rounds: int) -> float:
    """Requests/s the engine serves when always busy: one long overloaded run's run throughput."""
    probe = run(rounds, 1e4, 3_000)
    return measure(probe, 1e4).run_throughput


def test_one_call_per_request_work_rate_is_the_completion_rate() -> None:
    rate = 1.5 * capacity(1)
    result = run(1, rate, 1_500)
    point = measure(result, rate)
    assert work_rate(result, point) == pytest.approx(point.throughput, rel=1e-9)


def test_many_rounds_under_overload_work_rate_finds_the_capacity_completions_miss() -> None:
    cap = capacity(6)
    rate = 1.5 * cap
    result = run(6, rate, 1_500)
    point = measure(result, rate)
    served = work_rate(result, point)
    # completions lag the work done while half-done requests pile up; the work rate does not
    assert point.throughput < 0.9 * served
    assert served == pytest.approx(cap, rel=0.1)


def test_work_rate_needs_the_runs_trace() -> None:
    result = run(1, 10.0, 50, record=False)
    with pytest.raises(InvalidInputError, match="work_rate"):
        work_rate(result, measure(result, 10.0))


class Part(Rounds):
    """``rounds`` sequential calls of ``model`` per request, under its own name."""

    def __init__(self, name: str, model: str, rounds: int) -> None:
        super().__init__(rounds)
        self.name = name
        self.models = {model: SMALL.name}
        self.model = model

    def program(self, rng: np.random.Generator) -> Program:
        for _ in range(self.rounds):
            yield Llm(self.model, 400, 60)

    def mean_calls(self) -> dict[str, float]:
        return {self.model: float(self.rounds)}


def test_a_mix_keeps_up_only_when_each_part_does() -> None:
    """4% of the requests, each 12 rounds on their own LLM (offered what a burst of them all at
    once gets through, more than it serves at a steady rate), fall behind; counted over all
    requests the backlog grows within the bound, counted per part it does not."""
    heavy = Part("heavy", "b", 12)
    mix = Mix("mix", (Part("light", "a", 1), heavy), (0.96, 0.04))
    alone = Deployment(H100, {"b": SMALL}, {"b": Allocation(0.25, 1, 1)})
    probe = simulate(heavy, alone, poisson(1e4, 1_500, 3), SimOptions(seed=1))
    rate = measure(probe, 1e4).run_throughput / 0.04
    deployment = Deployment(
        H100, {"a": SMALL, "b": SMALL}, {"a": Allocation(1.0, 1, 4), "b": Allocation(0.25, 1, 1)}
    )
    requests = 8_000
    result = simulate(mix, deployment, poisson(rate, requests, 3), SimOptions(seed=1))
    groups = mix.groups(1, requests)
    assert list(groups[:50]) == [mix.parts.index(mix.part_of(1, i)) for i in range(50)]

    by_count = measure(result, rate)
    by_part = measure(result, rate, groups=groups)
    assert by_count.sustainable
    assert not by_part.sustainable
    light, behind = by_part.part_growth
    assert abs(light) < 0.01 and behind > 0.2
    # held to the bound scaled by its noise: sqrt(its share) x its growth
    share = by_part.part_share[1]
    assert share == pytest.approx(0.04, abs=0.01)
    assert by_part.backlog_growth == pytest.approx(behind * share**0.5)
    # the slowest part's median latency is what the run must span to settle
    slow = float(np.median(result.latency[groups == 1]))
    span = float(result.arrival[-1] - result.arrival[0])
    strict = MeasureConfig(min_span_latencies=1.1 * span / slow)
    assert measure(result, rate, strict).settled
    assert not measure(result, rate, strict, groups).settled


def test_a_sustainable_mix_with_a_part_still_draining_is_run_again() -> None:
    """A part of 10% of the requests shrinking by 8% (sqrt(0.1) x 8% = 2.5% > the 2% bound)
    is still draining; by 5% (1.6%) it is within the noise of its few requests."""
    point = Point(
        rate=1.0, requests=100, throughput=1.0, completion_ratio=1.0, backlog_growth=0.01,
        settled=True, mean_latency=1.0, p50_latency=1.0, p99_latency=2.0, sustainable=True,
        part_growth=(0.01, -0.08), part_share=(0.9, 0.1),
    )  # fmt: skip
    assert not clear(point, 0.02)
    assert clear(replace(point, part_growth=(0.01, -0.05)), 0.02)
    assert clear(replace(point, part_growth=(), part_share=()), 0.02)


def test_groups_must_name_every_request() -> None:
    result = run(1, 5.0, 50, record=False)
    with pytest.raises(InvalidInputError, match="groups has 49 entries for 50 requests"):
        measure(result, 5.0, groups=np.zeros(49, dtype=np.int64))
