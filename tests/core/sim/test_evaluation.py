"""The systems as planners and a CI-sized evaluation run end to end."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest

from services.core.errors import InvalidInputError
from services.core.sim import baselines
from services.core.sim.evaluation import refine, run_bench
from services.core.sim.gpus import MET, fewest
from services.core.sim.measure import AMBIGUOUS, UNSETTLED, MeasureConfig, clear
from services.core.sim.report import comparisons, peak
from services.core.sim.results import BenchSettings
from services.core.sim.runs import Counter, load_at, run_point
from services.core.sim.scoring import describe
from services.core.sim.systems import (
    SYSTEMS,
    Context,
    autoscaler_plan,
    cluster_nodes,
    hpa_targets,
    warmup_needed,
)
from services.core.sim.workflows import RagReranker

GPUS = 4


@pytest.fixture(scope="module")
def ctx() -> Context:
    return Context.prepare(RagReranker(), "H100-SXM", GPUS, warmup_requests=60)


def test_the_warm_up_trace_gives_the_workflow_statistics(ctx: Context) -> None:
    # RAG: 1 generator call per request; K ~ uniform{8..32} reranker calls all in parallel
    assert ctx.stats.requests == 60
    assert ctx.stats.llm("generator").n == 1.0
    assert 8 <= ctx.stats.llm("reranker").n <= 32
    assert ctx.stats.stages == (("reranker",), ("generator",))
    assert ctx.isolated_latency > 0


def test_clusters_are_nodes_of_eight_nvswitch_gpus() -> None:
    assert [len(n.gpus) for n in cluster_nodes("H100-SXM", 20)] == [8, 8, 4]
    assert all(n.largest_domain == len(n.gpus) for n in cluster_nodes("H100-SXM", 20))


def test_static_and_independent_plans_follow_their_definitions(ctx: Context) -> None:
    static = SYSTEMS["static"](ctx, GPUS, 5.0)
    assert static.allocation == baselines.even_split(ctx.models, GPUS, ctx.fits)
    independent = SYSTEMS["independent"](ctx, GPUS, 5.0)
    loads = {d.model: 5.0 * d.n for d in ctx.demand.llms}
    assert independent.allocation == baselines.independent(
        loads, ctx.profiles.profile, ctx.fits, GPUS
    )
    assert all(a.fraction == 1.0 for a in independent.allocation.values())


def test_scepsy_plans_within_the_gpus_and_falls_back_to_its_capacity(ctx: Context) -> None:
    low = SYSTEMS["scepsy"](ctx, GPUS, 2.0)
    assert low.planned_rate is None and low.prediction is not None and low.prediction.feasible
    assert sum(a.gpus for a in low.allocation.values()) <= GPUS
    # far above what 4 GPUs can serve: the plan for the highest plannable rate
    high = SYSTEMS["scepsy"](ctx, GPUS, 1000.0)
    assert high.planned_rate is not None
    assert high.planned_rate <= ctx.rho * ctx.capacity(GPUS) * (1 + 1e-9)


def test_the_autoscaler_starts_from_the_even_split_with_tuned_targets(ctx: Context) -> None:
    plan = autoscaler_plan(baselines.HpaAutoscaler())(ctx, GPUS, 5.0)
    assert plan.allocation == SYSTEMS["static"](ctx, GPUS, 5.0).allocation
    assert isinstance(plan.controller, baselines.HpaAutoscaler)
    assert plan.controller.targets == hpa_targets(ctx, plan.allocation)


def test_a_quick_evaluation_runs_end_to_end_and_its_ratios_follow_the_curves() -> None:
    settings = BenchSettings.quick(gpu_counts=(GPUS,), systems=("scepsy", "static"))
    result = run_bench([RagReranker()], settings)
    (wf,) = result.workflows
    (gpu,) = wf.gpus
    assert [c.system for c in gpu.curves] == ["scepsy", "static"]
    assert all(len(c.points) >= 1 for c in gpu.curves)
    (row,) = comparisons(result)
    assert row.scepsy_peak == peak(gpu.curve("scepsy"))
    assert row.baseline_peak == peak(gpu.curve("static"))
    if row.peak_ratio is not None:
        assert row.peak_ratio == pytest.approx(row.scepsy_peak / row.baseline_peak)
    assert gpu.alp_throughput is not None and math.isfinite(gpu.alp_throughput.error)
    assert wf.stability[0].source.startswith("warm-up")
    assert result.calls > 0
    # deterministic: the same settings give the same curves
    again = run_bench([RagReranker()], settings)
    assert again.workflows[0].gpus == result.workflows[0].gpus


def test_systems_that_bisect_to_the_same_rate_serve_the_same_arrivals(ctx: Context) -> None:
    # two curves with the same bracket (sustainable at lo, not at hi) bisect to the same rate:
    # the same plan there must measure the same, or a comparison at that rate is seed noise
    settings = BenchSettings.quick(gpu_counts=(GPUS,), systems=("scepsy", "static"), refine_steps=1)
    capacity = ctx.capacity(GPUS)
    lo, hi = 0.3 * capacity, 3.0 * capacity
    loads = {r: load_at(ctx, r, i, settings) for i, r in enumerate((lo, hi))}
    counter = Counter()
    grid = [run_point(ctx, SYSTEMS["static"](ctx, GPUS, r), loads[r], GPUS, settings, counter)
            for r in (lo, hi)]  # fmt: skip
    assert grid[0].sustainable and not grid[1].sustainable
    first, second = list(grid), list(grid)
    refine(ctx, GPUS, "static", first, loads, settings, counter)
    refine(ctx, GPUS, "static", second, loads, settings, counter)
    assert len(first) == len(second) == 3
    assert first[-1].rate == second[-1].rate == (lo + hi) / 2
    assert first[-1] == second[-1]
    assert sorted(loads) == [lo, (lo + hi) / 2, hi]  # one new load for the shared rate


def test_a_run_near_the_steady_state_bound_is_run_longer_before_it_is_judged(ctx: Context) -> None:
    settings = BenchSettings.quick(
        gpu_counts=(GPUS,),
        systems=("scepsy", "static"),
        doublings=1,
        duration=60.0,
        max_calls=20_000,
        measure=MeasureConfig(min_span_latencies=4.0),  # the strict 2% bound
    )
    bound = settings.measure.max_backlog_growth
    capacity = ctx.capacity(GPUS)
    plan = SYSTEMS["static"](ctx, GPUS, capacity)
    verdicts = []
    for i, f in enumerate((0.8, 0.9, 0.95, 1.0, 1.05, 1.1, 1.2)):
        load = load_at(ctx, f * capacity, i, settings)
        short = run_point(ctx, plan, load, GPUS, replace(settings, doublings=0), Counter())
        point = run_point(ctx, plan, load, GPUS, settings, Counter())
        longer = point.calls > 1.5 * short.calls  # the run was repeated with twice the requests
        ambiguous = not clear(short, bound)
        band = (AMBIGUOUS if short.settled else UNSETTLED) * bound
        assert ambiguous == (
            (not short.sustainable and short.backlog_growth <= band)
            or (short.sustainable and short.backlog_growth < -bound)
        )
        verdicts.append((short.settled, ambiguous))
        # a verdict within the noise of a short run is never taken from the short run
        assert longer == ambiguous, (f, short, point)
    # the rates cover a short run that settled within the noise band and one judged at once
    assert (True, True) in verdicts and any(not ambiguous for _, ambiguous in verdicts), verdicts


def test_a_draining_backlog_is_not_a_steady_state_verdict(ctx: Context) -> None:
    settings = BenchSettings.quick(gpu_counts=(GPUS,), systems=("scepsy", "static"))
    bound = settings.measure.max_backlog_growth
    plan = SYSTEMS["static"](ctx, GPUS, ctx.capacity(GPUS))
    point = run_point(ctx, plan, load_at(ctx, 0.5 * ctx.capacity(GPUS), 0, settings), GPUS,
                      settings, Counter())  # fmt: skip
    assert point.sustainable
    steady = replace(point, backlog_growth=0.5 * bound)
    draining = replace(point, backlog_growth=-1.5 * bound)
    growing = replace(point, sustainable=False, backlog_growth=1.5 * bound)
    overloaded = replace(point, sustainable=False, backlog_growth=(AMBIGUOUS + 1) * bound)
    assert clear(steady, bound) and clear(overloaded, bound)
    assert not clear(draining, bound) and not clear(growing, bound)
    # a run too short for its latencies: a queue still filling is not yet a verdict
    filling = replace(overloaded, settled=False)
    assert not clear(filling, bound)
    assert clear(replace(filling, backlog_growth=(UNSETTLED + 1) * bound), bound)


def test_an_auto_warm_up_is_sized_by_the_spread_of_the_first_one() -> None:
    first = Context.prepare(RagReranker(), "H100-SXM", GPUS, warmup_requests=40)
    needed = warmup_needed(first.warmup, "rag", 0.05)
    assert 40 < needed < 2_000  # RAG's LLM time per request varies (8-32 reranker calls)
    sized = Context.prepare(RagReranker(), "H100-SXM", GPUS, warmup_requests=40, warmup_error=0.05)
    assert sized.stats.requests == needed
    # a looser error never shrinks the warm-up below the given size; the cap bounds it
    loose = Context.prepare(RagReranker(), "H100-SXM", GPUS, warmup_requests=40, warmup_error=0.9)
    assert loose.stats.requests == 40
    capped = Context.prepare(
        RagReranker(), "H100-SXM", GPUS, warmup_requests=40, warmup_error=0.01, warmup_max=70
    )
    assert capped.stats.requests == 70
    # the required size falls with the square of the error
    assert warmup_needed(first.warmup, "rag", 0.025) == pytest.approx(4 * needed, rel=0.02)
    with pytest.raises(InvalidInputError, match="warmup_error"):
        warmup_needed(first.warmup, "rag", 0.0)


def test_the_fewest_gpus_plan_meets_its_objective_on_two_draws(ctx: Context) -> None:
    """The replay's scoring draw and an independent one both meet the objective (one lucky
    sample of requests does not buy GPUs), and it frees GPUs against the minimum latency."""
    rate = 0.5 * ctx.capacity(GPUS)
    best = SYSTEMS["scepsy"](ctx, GPUS, rate)
    slo = 1.3 * ctx.score_replay(best.allocation, rate).latency
    mine = fewest(ctx, GPUS, rate, slo)
    for draw in (0, 1):
        scored = ctx.scorer.scores[(describe(mine), round(rate, 9), draw)]
        assert scored.steady and scored.latency <= slo * MET
    assert sum(a.gpus for a in mine.values()) < sum(a.gpus for a in best.allocation.values())
