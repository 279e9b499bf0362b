"""The wave replay of a loop of data-dependent length (ReAct: planner turns, tools in parallel,
a reviewer) keeps the program's timing under load: replaying exactly the requests the program
ran gives the program's mean latency (services/core/sim/replay.py). What the replay can get
wrong is only which requests it replays: a short warm-up trace of such a loop is a poor sample
(README, The ALP against the simulator)."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import pytest

from services.core.allocation import Allocation
from services.core.cluster.hardware import gpu_spec
from services.core.cluster.models import model_spec
from services.core.sim.arrivals import poisson
from services.core.sim.program import Program
from services.core.sim.replay import ReplayRequest, TraceReplay, request_program
from services.core.sim.simulator import Deployment, SimOptions, simulate
from services.core.sim.workflows import ReactAgent
from services.core.workload.trace import Trace

REACT = ReactAgent()
REQUESTS = 500


class InOrder:
    """Replays request i of a trace as request i: the simulator's generator of request i
    (``default_rng([seed, i])``) is recognised by its first draw."""

    def __init__(self, replay: TraceReplay, seed: int) -> None:
        self.name = replay.name
        self.models: Mapping[str, str] = replay.models
        self.requests = replay.requests
        self.index = {
            int(np.random.default_rng([seed, i]).integers(2**62)): i
            for i in range(len(replay.requests))
        }
        self.replay = replay

    def program(self, rng: np.random.Generator) -> Program:
        request: ReplayRequest = self.requests[self.index[int(rng.integers(2**62))]]
        return request_program(request)

    def mean_calls(self) -> dict[str, float]:
        return self.replay.mean_calls()


@pytest.mark.parametrize("work", [1.5, 3.5])
def test_replaying_the_programs_own_requests_gives_its_latency_under_load(work: float) -> None:
    gpu = gpu_spec("H100-SXM")
    models = {m: model_spec(c) for m, c in REACT.models.items()}
    deployment = Deployment(
        gpu, models, {"planner": Allocation(1.0, 1, 2), "reviewer": Allocation(0.5, 1, 1)}
    )
    # the trace of the same requests (seed 0), served one at a time
    alone = np.arange(REQUESTS, dtype=np.float64) * 1e4
    traced = simulate(REACT, deployment, alone, SimOptions(seed=0, record=True))
    replay = TraceReplay.of(Trace(traced.trace, traced.requests), REACT.name, REACT.models)
    assert len(replay.requests) == REQUESTS
    in_order = InOrder(replay, seed=0)
    # offered planner call time per replica-second, at the durations of calls served alone
    # (batching serves several at once: 3.5 lengthens requests by about 40%)
    planner_time = sum(c.end - c.start for c in traced.trace if c.model == "planner")
    rate = work * 2 * REQUESTS / planner_time  # two planner replicas
    arrivals = poisson(rate, REQUESTS, 7)
    program = simulate(REACT, deployment, arrivals, SimOptions(seed=0))
    replayed = simulate(in_order, deployment, arrivals, SimOptions(seed=0))
    assert replayed.calls == program.calls
    mean = float(np.mean(program.latency))
    assert mean > float(np.mean(traced.latency)) * (1.1 if work > 2 else 1.0)  # under load
    assert float(np.mean(replayed.latency)) == pytest.approx(mean, rel=0.02)
