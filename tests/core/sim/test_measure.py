"""``measure.work_rate``: the served work of an overloaded run, against its completion rate."""

from __future__ import annotations

import numpy as np
import pytest

from services.core.allocation import Allocation
from services.core.cluster.hardware import gpu_spec
from services.core.cluster.models import model_spec
from services.core.errors import InvalidInputError
from services.core.sim.arrivals import poisson
from services.core.sim.measure import measure, work_rate
from services.core.sim.program import Llm, Program
from services.core.sim.simulator import Deployment, SimOptions, SimResult, simulate

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
