"""A traced workflow replayed wave by wave (services/core/sim/replay.py) and the Scepsy system's
refinement by simulating the replay (services/core/sim/systems.py)."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from services.core.allocation import Allocation
from services.core.errors import InvalidInputError
from services.core.sim.program import Workflow, run_instantly
from services.core.sim.replay import TraceReplay, waves_of
from services.core.sim.scoring import ReplayScorer, describe, parse_described
from services.core.sim.systems import SYSTEMS, Context, RefineSettings
from services.core.sim.workflows import BeamSearch, coserve
from services.core.workload.trace import Trace, TraceCall, TraceRequest

BEAM = BeamSearch(max_rounds=6, p_answer=0.4)


def call(rid: str, model: str, start: float, end: float, prompt: int = 10) -> TraceCall:
    return TraceCall("w", rid, f"{rid}-{model}-{start}", model, start, end, prompt, 2)


def test_calls_that_overlap_form_one_wave_and_gaps_are_tool_time() -> None:
    calls = [
        call("r", "a", 1.0, 2.0),
        call("r", "a", 1.0, 2.5),  # a fan-out of two
        call("r", "b", 3.0, 4.0),  # after a 0.5 s tool: a new wave
        call("r", "b", 3.5, 4.2),  # started before the first b ended: same wave
    ]
    request = waves_of(calls, 0.2, 5.0)
    assert [gap for gap, _ in request.waves] == pytest.approx([0.8, 0.5])
    assert [[m for m, _, _ in wave] for _, wave in request.waves] == [["a", "a"], ["b", "b"]]
    assert request.tail == pytest.approx(0.8)


def test_replay_program_makes_the_traced_calls() -> None:
    trace = Trace(
        (call("r1", "a", 0.0, 1.0, 7), call("r1", "b", 1.5, 2.0, 9)),
        (TraceRequest("w", "r1", 0.0, 2.0),),
    )
    replay = TraceReplay.of(trace, "w", {"a": "m1", "b": "m2"})
    calls, tools = run_instantly(replay.program(np.random.default_rng(0)))
    assert [(c.model, c.prompt_tokens) for c in calls] == [("a", 7), ("b", 9)]
    assert [t.seconds for t in tools] == pytest.approx([0.5])
    assert replay.mean_calls() == {"a": 1.0, "b": 1.0}


def test_a_trace_without_the_workflow_or_with_unknown_models_is_refused() -> None:
    trace = Trace((call("r1", "a", 0.0, 1.0),))
    with pytest.raises(InvalidInputError, match="no successful call of workflow 'x'"):
        TraceReplay.of(trace, "x", {"a": "m"})
    with pytest.raises(InvalidInputError, match=r"\['a'\] not in the spec"):
        TraceReplay.of(trace, "w", {"b": "m"})


@pytest.fixture(scope="module")
def ctx() -> Context:
    small = RefineSettings(candidates=3, headroom=(1.3,), calls=8_000, min_requests=60)
    return replace(Context.prepare(BEAM, "H100-SXM", 4, warmup_requests=40), refine=small)


def test_beam_replay_alternates_policy_and_prm_behind_a_barrier(ctx: Context) -> None:
    replay = ctx.replay
    traced = {m.model: m.n for m in ctx.stats.llms}
    for model, n in replay.mean_calls().items():
        assert n == pytest.approx(traced[model], rel=1e-9)
    for request in replay.requests:
        models = [{m for m, _, _ in wave} for _, wave in request.waves]
        assert all(len(s) == 1 for s in models)  # a wave holds one LLM's fan-out
        assert [next(iter(s)) for s in models] == ["policy", "prm"] * (len(models) // 2)


def test_replay_scores_follow_the_capacity(ctx: Context) -> None:
    small = {"policy": Allocation(0.25, 1, 1), "prm": Allocation(0.25, 1, 1)}
    large = {"policy": Allocation(1.0, 1, 2), "prm": Allocation(1.0, 1, 2)}
    rate = 0.4 * ctx.capacity(4)
    fast, slow = ctx.score_replay(large, rate), ctx.score_replay(small, rate)
    assert fast.steady
    assert not slow.steady or slow.latency > fast.latency
    assert fast.latency < slow.latency
    assert ctx.score_replay(large, rate) is fast  # remembered


def test_scepsy_plans_are_refined_and_the_closed_ablation_is_not(ctx: Context) -> None:
    rate = 0.5 * ctx.capacity(4)
    refined = SYSTEMS["scepsy"](ctx, 4, rate)
    closed = SYSTEMS["scepsy-closed"](ctx, 4, rate)
    assert refined.simulated_latency is not None and refined.simulated_latency > 0
    assert closed.simulated_latency is None
    # the refined plan is the one whose replay was fastest among those scored
    scored = ctx.score_replay(refined.allocation, rate)
    assert scored.latency == pytest.approx(refined.simulated_latency)


def test_co_serving_plans_both_workflows_on_the_shared_llm() -> None:
    mix = coserve((0.7, 0.3))
    ctx = replace(
        Context.prepare(mix, "H100-SXM", 4, warmup_requests=40),
        refine=RefineSettings(candidates=2, headroom=(), calls=6_000, min_requests=40),
    )
    assert ctx.shares == {"rag": 0.7, "beam": 0.3}
    by_name = {d.name: {m.model: m.n for m in d.llms} for d in ctx.demands}
    assert set(by_name["rag"]) == {"generator", "reranker"}
    assert set(by_name["beam"]) == {"generator", "prm"}
    # the generator carries both workflows' calls
    loads = ctx.loads(2.0)
    assert loads["generator"] == pytest.approx(
        2.0 * (0.7 * by_name["rag"]["generator"] + 0.3 * by_name["beam"]["generator"])
    )
    rate = 0.4 * ctx.capacity(4)
    plan = SYSTEMS["scepsy"](ctx, 4, rate)
    assert set(plan.allocation) == {"generator", "prm", "reranker"}
    assert plan.prediction is not None
    assert ctx.throughput_of(plan.prediction) >= rate
    result = ctx.serve(plan, np.arange(20, dtype=np.float64) / rate)
    assert np.all(np.isfinite(result.latency))


def _fresh(base: ReplayScorer, **changes: object) -> ReplayScorer:
    return ReplayScorer(
        base.workflow, base.gpu, base.models, base.isolated_latency, base.options,
        replace(base.settings, **changes), base.spread_requests,
    )  # fmt: skip


def _recording(scorer: ReplayScorer) -> list[tuple[int, int]]:
    """The (request count, seed) of ``scorer``'s runs, as it asks for them."""
    runs: list[tuple[int, int]] = []
    draw = scorer.run_workflow

    def recorded(requests: int, seed: int) -> Workflow:
        runs.append((requests, seed))
        return draw(requests, seed)

    scorer.run_workflow = recorded  # type: ignore[method-assign]
    return runs


def test_a_score_carries_the_standard_error_of_its_latency(ctx: Context) -> None:
    allocation = {"policy": Allocation(1.0, 1, 2), "prm": Allocation(1.0, 1, 2)}
    rate = 0.4 * ctx.capacity(4)
    short = _fresh(ctx.scorer, min_requests=100, spread_calls=1, calls=1, doublings=0)
    long = _fresh(ctx.scorer, min_requests=1600, spread_calls=1, calls=1, doublings=0)
    short_runs, long_runs = _recording(short), _recording(long)
    few, many = short.score(allocation, rate), long.score(allocation, rate)
    assert [n for n, _ in short_runs + long_runs] == [100, 1600]
    # 16x the requests: about a quarter of the error (1 / sqrt(16)), never zero
    assert 0 < many.error < 0.5 * few.error < 0.5


def test_a_run_too_short_for_its_queue_is_run_longer_before_it_is_scored(ctx: Context) -> None:
    base = ctx.scorer
    allocation = {"policy": Allocation(1.0, 1, 1), "prm": Allocation(1.0, 1, 1)}
    capacity = base.capacity(allocation, 2 * ctx.capacity(4))

    def scorer(doublings: int) -> tuple[ReplayScorer, list[tuple[int, int]]]:
        made = _fresh(base, doublings=doublings)
        return made, _recording(made)

    # near capacity the short run's queue is still filling: it looks steady and fast
    short, short_runs = scorer(0)
    first = short.score(allocation, 0.85 * capacity)
    assert len(short_runs) == 1 and first.steady
    longer, recorded = scorer(2)
    found = longer.score(allocation, 0.85 * capacity)
    runs = [n for n, _ in recorded]
    assert runs[0] == short_runs[0][0] and runs[1:] == [2 * runs[0], 4 * runs[0]][: len(runs) - 1]
    assert len(runs) > 1 and found.latency > 1.3 * first.latency
    # clearly overloaded: one run is enough to say so
    over, over_runs = scorer(2)
    assert not over.score(allocation, 3 * capacity).steady
    assert len(over_runs) == 1
    with pytest.raises(InvalidInputError, match="doublings"):
        RefineSettings(doublings=-1)
    with pytest.raises(InvalidInputError, match="budget_calls"):
        RefineSettings(budget_calls=0)


def test_the_confirmation_scores_an_independent_draw_and_every_call_counts(ctx: Context) -> None:
    scorer = _fresh(ctx.scorer)
    allocation = {"policy": Allocation(1.0, 1, 2), "prm": Allocation(1.0, 1, 2)}
    rate = 0.4 * ctx.capacity(4)
    recorded = _recording(scorer)
    first = scorer.score(allocation, rate)
    after_first = scorer.simulated
    other = scorer.score(allocation, rate, draw=1)
    seeds = [seed for _, seed in recorded]
    assert len(set(seeds)) == 2  # other requests, not the same ones again
    assert other.latency != first.latency
    assert scorer.score(allocation, rate) is first and scorer.score(allocation, rate, 1) is other
    assert 0 < after_first < scorer.simulated  # both runs' calls counted, once each
    # the refiner confirms at 1.05x on the scoring draw, then at 1x on draw 1, and counts its
    # budget in simulated calls
    refiner = scorer.refiner(rate)
    assert refiner.work is not None and refiner.budget == scorer.settings.budget_calls
    assert refiner.confirm is not None
    headroom = scorer.score(allocation, rate * scorer.settings.confirm)
    assert headroom.steady and refiner.confirm(allocation) is other
    # past its capacity the headroom run falls behind and answers alone: no draw-1 run
    over = 2 * scorer.capacity(allocation, 2 * rate)
    runs = len(recorded)
    refuted = scorer.confirmation(allocation, over)
    assert not refuted.steady and refuted is scorer.score(allocation, over * 1.05)
    assert {seed for _, seed in recorded[runs:]} == {seeds[0]}


def test_a_described_allocation_reads_back() -> None:
    allocation = {"generator": Allocation(1.0, 2, 3), "reranker": Allocation(0.25, 1, 4)}
    assert parse_described(describe(allocation)) == allocation
    with pytest.raises(InvalidInputError, match="--alloc: 'generator 2x'"):
        parse_described("generator 2x", "--alloc")
    assert parse_described(describe(allocation), models=allocation) == allocation
    with pytest.raises(InvalidInputError, match=r"missing \['prm'\], unknown \['reranker'\]"):
        parse_described(describe(allocation), "--alloc", ("generator", "prm"))
