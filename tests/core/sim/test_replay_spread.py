"""Replay runs sized and drawn for a trace whose work sits in a few heavy requests
(services/core/sim/replay.py ``StratifiedReplay``, scoring.py ``spread_requests``,
runs.py ``requests_for``): co-serving RAG with a 10% share of beam search."""

from __future__ import annotations

import statistics
from dataclasses import replace

import numpy as np
import pytest

from services.core.allocation import Allocation
from services.core.errors import InvalidInputError
from services.core.sim.program import Llm, Parallel, Tool
from services.core.sim.replay import ReplayRequest, StratifiedReplay, TraceReplay
from services.core.sim.results import BenchSettings
from services.core.sim.runs import requests_for
from services.core.sim.scoring import ReplayScorer, spread_requests
from services.core.sim.systems import Context
from services.core.sim.workflows import coserve
from services.core.workload.trace import Trace, TraceCall

GPUS = 4


def heavy_tailed_trace(requests: int = 200, heavy_every: int = 10) -> Trace:
    """One call per request of 1 s, every ``heavy_every``-th request 40 calls of 1 s."""
    calls = []
    for i in range(requests):
        rid = f"r{i}"
        n = 40 if i % heavy_every == 0 else 1
        for k in range(n):
            calls.append(
                TraceCall("w", rid, f"{rid}-{k}", "m", 10.0 * i + k, 10.0 * i + k + 1, 5, 1)
            )
    return Trace(tuple(calls), ())


def test_spread_requests_follow_the_work_per_request_spread() -> None:
    trace = heavy_tailed_trace()
    work = np.array([40.0 if i % 10 == 0 else 1.0 for i in range(200)])
    cv = work.std(ddof=1) / work.mean()
    assert spread_requests(trace, ("w",), 0.05) == int(np.ceil((cv / 0.05) ** 2))
    # four times the requests for half the error; nothing of another workflow
    assert spread_requests(trace, ("w",), 0.025) == pytest.approx(
        4 * spread_requests(trace, ("w",), 0.05), rel=0.01
    )
    assert spread_requests(trace, ("other",), 0.05) == 0
    with pytest.raises(InvalidInputError, match="error"):
        spread_requests(trace, ("w",), 0.0)


def test_a_stratified_draw_carries_the_traces_mean_work_in_random_order() -> None:
    replay = TraceReplay.of(heavy_tailed_trace(), "w", {"m": "x"})
    mean = statistics.fmean(replay.work)
    for requests in (50, 130, 450):
        iid_errors, strat_errors = [], []
        for seed in range(20):
            drawn = StratifiedReplay.of(replay, requests, seed)
            assert len(drawn.order) == requests
            strat_errors.append(
                abs(statistics.fmean(replay.work[i] for i in drawn.order) / mean - 1)
            )
            rng = np.random.default_rng(seed)
            iid = rng.integers(len(replay.requests), size=requests)
            iid_errors.append(abs(statistics.fmean(replay.work[i] for i in iid) / mean - 1))
        # within one heavy request of the mean; iid draws miss by several
        assert max(strat_errors) <= 40 / (requests * mean) + 1e-9
        assert statistics.fmean(iid_errors) > 3 * statistics.fmean(strat_errors)
    # every traced request requests // N times, then a sample of the rest; not in work order
    drawn = StratifiedReplay.of(replay, 450, 7)
    counts = np.bincount(np.asarray(drawn.order), minlength=200)
    assert counts.min() >= 2 and counts.max() <= 3
    heavy = [i for i, w in enumerate(replay.work) if w > 1]
    assert sum(counts[i] for i in heavy) == 45  # 10% of the run, exactly
    assert list(drawn.order) != sorted(drawn.order, key=lambda i: replay.work[i])
    assert drawn.order != StratifiedReplay.of(replay, 450, 8).order
    with pytest.raises(InvalidInputError, match="requests"):
        StratifiedReplay.of(replay, 0, 1)


def test_request_i_of_a_stratified_run_replays_its_traced_request() -> None:
    request = ReplayRequest(((0.0, (("m", 5, 1),)), (0.5, (("m", 3, 2), ("m", 4, 2)))), 0.25)
    replay = TraceReplay("w", {"m": "x"}, (request,), (2.0,))
    drawn = StratifiedReplay.of(replay, 3, 0)
    steps = list(drawn.program_at(1, np.random.default_rng(0)))
    assert steps == [
        Llm("m", 5, 1),
        Tool("gap", 0.5),
        Parallel((Llm("m", 3, 2), Llm("m", 4, 2))),
        Tool("gap", 0.25),
    ]
    # past the run's length a request is drawn as the plain replay draws it
    assert next(iter(drawn.program_at(5, np.random.default_rng(0)))) == Llm("m", 5, 1)


@pytest.fixture(scope="module")
def mix() -> Context:
    return Context.prepare(coserve(), "H100-SXM", GPUS, warmup_requests=400)


def test_runs_of_a_heavy_tailed_mix_are_sized_by_its_spread(mix: Context) -> None:
    settings = BenchSettings(gpu_counts=(GPUS,))
    spread = mix.spread_requests(0.05)
    # a 10% share of beam search: far more requests than a rate x duration run holds
    assert spread > 1_000
    sized = requests_for(mix, 1.0, settings)
    plain = requests_for(mix, 1.0, replace(settings, run_error=None))
    cap = int(settings.spread_calls / mix.calls_per_request)
    assert sized == min(spread, cap) > plain
    with pytest.raises(InvalidInputError, match="run_error"):
        BenchSettings(run_error=0.0)


def test_stratified_scores_of_the_mix_vary_less_by_seed_than_iid_draws(mix: Context) -> None:
    base = mix.scorer
    allocation = {m: Allocation(1.0, 1, 1) for m in mix.models}
    allocation["generator"] = Allocation(1.0, 1, 2)
    rate = 0.5 * mix.capacity(GPUS)
    settings = replace(base.settings, run_error=0.1, min_seconds=1.0, latency_multiple=1.0)
    spread = mix.spread_requests(0.1)

    def latencies(stratified: bool) -> list[float]:
        out = []
        for seed in range(5):
            scorer = ReplayScorer(
                base.workflow, base.gpu, base.models, base.isolated_latency, base.options,
                replace(settings, seed=seed), spread,
            )  # fmt: skip
            if not stratified:
                scorer.run_workflow = lambda requests, seed: base.workflow  # type: ignore[method-assign]
            out.append(scorer.score(allocation, rate).latency)
        return out

    strat, iid = latencies(True), latencies(False)
    assert statistics.pstdev(strat) < 0.5 * statistics.pstdev(iid)
