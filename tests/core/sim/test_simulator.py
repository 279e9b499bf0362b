"""The discrete-event simulator: programs, routing, traces, determinism, controllers."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pytest

from services.core.allocation import Allocation
from services.core.cluster.hardware import gpu_spec
from services.core.cluster.models import model_spec
from services.core.errors import InvalidInputError
from services.core.perf.model import PerfModel, StepLoad, chunk_pairs
from services.core.sim.control import ClusterView, ScaleAction
from services.core.sim.program import Llm, Parallel, Program, Tool
from services.core.sim.simulator import Deployment, SimOptions, simulate
from services.core.sim.workflows import RagReranker
from services.core.workload.stats import workflow_stats
from services.core.workload.trace import Trace, dumps, parse_trace_lines

H100 = gpu_spec("H100-SXM")
SMALL = model_spec("meta-llama/Llama-3.2-1B")
PERF = PerfModel.create(SMALL, H100)


@dataclass(frozen=True)
class Scripted:
    """A workflow whose program is given as a function of the random generator."""

    make: Any
    name: str = "scripted"
    models: Mapping[str, str] = field(default_factory=lambda: {"a": SMALL.name, "b": SMALL.name})

    def program(self, rng: np.random.Generator) -> Program:
        result: Program = self.make(rng)
        return result

    def mean_calls(self) -> dict[str, float]:
        return {}


def deployment(a: int = 1, b: int = 1) -> Deployment:
    alloc = {"a": Allocation(1.0, 1, a), "b": Allocation(1.0, 1, b)}
    return Deployment(H100, {"a": SMALL, "b": SMALL}, alloc)


def alone(prompt: int, completion: int) -> float:
    """Latency of one call on an idle engine: its prefill, then completion - 1 decode steps."""
    prefill = PERF.step_time(
        StepLoad(prefill_tokens=prompt, prefill_pairs=chunk_pairs(0, prompt), prefill_seqs=1)
    )
    return prefill + sum(
        PERF.step_time(StepLoad(decode_seqs=1, decode_context=prompt + j))
        for j in range(1, completion)
    )


def test_sequential_calls_and_a_tool_add_up() -> None:
    def make(rng: np.random.Generator) -> Program:
        yield Llm("a", 300, 20)
        yield Tool("search", 0.25)
        yield Llm("b", 500, 1)

    result = simulate(Scripted(make), deployment(), [1.0])
    # a request alone: call a, then 0.25 s of tool, then call b (a prefill only)
    expected = alone(300, 20) + 0.25 + alone(500, 1)
    assert result.latency[0] == pytest.approx(expected, rel=1e-9)
    assert result.calls_by_model == {"a": 1, "b": 1}


def test_a_fan_out_to_one_replica_runs_as_one_batch() -> None:
    def make(rng: np.random.Generator) -> Program:
        yield Parallel(tuple(Llm("a", 100, 1) for _ in range(4)))

    result = simulate(Scripted(make), deployment(), [0.0])
    # four prompts of 100 tokens reach the idle engine at the same instant: one prefill step
    step = PERF.step_time(
        StepLoad(prefill_tokens=400, prefill_pairs=4 * chunk_pairs(0, 100), prefill_seqs=4)
    )
    assert result.latency[0] == pytest.approx(step, rel=1e-12)


def test_parallel_branches_on_two_replicas_take_the_longer_one() -> None:
    def branch(tokens: int) -> Program:
        yield Llm("a", tokens, 10)

    def make(rng: np.random.Generator) -> Program:
        yield Parallel((branch(200), branch(2000)))

    result = simulate(Scripted(make), deployment(a=2), [0.0], SimOptions(record=True))
    # least outstanding routing puts the two calls on different replicas: no interference
    assert result.latency[0] == pytest.approx(alone(2000, 10), rel=1e-9)
    assert sorted(c.replica or "" for c in result.trace) == ["a/0", "a/1"]


def test_same_seed_same_result_other_seed_other_requests() -> None:
    wf = RagReranker()
    dep = Deployment(
        H100,
        {m: model_spec(c) for m, c in wf.models.items()},
        {"generator": Allocation(1.0, 1, 1), "reranker": Allocation(0.5, 1, 2)},
    )
    arrivals = np.cumsum(np.full(60, 0.2))
    one = simulate(wf, dep, arrivals, SimOptions(seed=3, record=True))
    two = simulate(wf, dep, arrivals, SimOptions(seed=3, record=True))
    other = simulate(wf, dep, arrivals, SimOptions(seed=4))
    assert np.array_equal(one.finish, two.finish)
    assert one.trace == two.trace
    assert not np.array_equal(one.finish, other.finish)


def test_the_trace_is_the_router_format_and_gives_the_statistics() -> None:
    wf = RagReranker()
    dep = Deployment(
        H100,
        {m: model_spec(c) for m, c in wf.models.items()},
        {"generator": Allocation(1.0, 1, 1), "reranker": Allocation(1.0, 1, 1)},
    )
    result = simulate(wf, dep, np.arange(40) * 5.0, SimOptions(record=True))
    lines = [dumps(r) for r in (*result.trace, *result.requests)]
    trace = parse_trace_lines(lines)  # validates every field
    assert trace == Trace(result.trace, result.requests)
    (stats,) = workflow_stats(trace)
    assert stats.requests == 40
    assert stats.llm("generator").n == 1.0
    assert stats.llm("reranker").n == result.calls_by_model["reranker"] / 40
    assert stats.stages == (("reranker",), ("generator",))


def test_a_model_the_deployment_lacks_is_an_error() -> None:
    def make(rng: np.random.Generator) -> Program:
        yield Llm("c", 10, 1)

    with pytest.raises(InvalidInputError, match="does not serve"):
        simulate(Scripted(make), deployment(), [0.0])


@dataclass(frozen=True)
class AddOneB:
    """Adds one replica of b at the first decision, then nothing."""

    interval: float = 1.0

    def initial_state(self) -> int:
        return 0

    def decide(self, view: ClusterView, state: int) -> tuple[tuple[ScaleAction, ...], int]:
        if state == 0:
            return (ScaleAction("b", +1), ScaleAction("b", +1)), 1
        return (), state


def test_a_controller_starts_replicas_from_the_pool_after_the_start_delay() -> None:
    def make(rng: np.random.Generator) -> Program:
        yield Llm("b", 100, 5)

    options = SimOptions(engine_start_delay=10.0, gpus=3.0)
    result = simulate(Scripted(make), deployment(), np.arange(30) * 1.0, options, AddOneB())
    # 3 GPUs, 2 used: the first +1 gets the free GPU at t=1, the second finds none left
    assert [(e.time, e.replica, e.event) for e in result.scaling] == [
        (1.0, "1", "start"),
        (11.0, "1", "ready"),
    ]
