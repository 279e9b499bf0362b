"""The evaluation's checks beside the curves: ALP throughput, the oracle, stability.

- ``check_throughput``: Scepsy's maximum-throughput plan (planned for the ALP's highest
  throughput on the GPUs), its predicted throughput against the work rate simulated under
  ``overload`` x that prediction (the cluster's capacity, ``measure.work_rate``);
- ``run_oracle``: at a moderate rate (the highest of Scepsy's sustainable grid rates at most
  ``oracle_load`` x its peak), every maximal allocation (``baselines.oracle_candidates``) whose
  per-LLM capacity (replicas x profiled saturation rate) exceeds the LLM's load competes by
  successive halving on selection loads (``oracle_requests`` requests each, the best quarter
  kept with three times the requests, and so on down to three); those three run again on the
  measured load of Scepsy's point, and the best sustainable one is the oracle. Skipped when more
  than ``oracle_max_candidates`` candidates remain;
- ``loaded_stats`` and ``stability_of``: per-LLM time shares and end-to-end latency CV of a trace.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace

from services.core.allocation import Allocation
from services.core.errors import InfeasibleError
from services.core.sim import baselines
from services.core.sim.arrivals import poisson
from services.core.sim.measure import Point, measure, work_rate
from services.core.sim.results import AlpCheck, BenchSettings, OracleResult, Stability
from services.core.sim.runs import Counter, Load, load_at, run_point
from services.core.sim.scoring import describe
from services.core.sim.systems import SYSTEMS, Context, Setup
from services.core.workload.stats import WorkflowStats, workflow_stats
from services.core.workload.trace import Trace

Progress = Callable[[str], None]
SEED_OVERLOAD = 991
SEED_SELECTION = 17
SEED_LOADED = 4242


def check_throughput(
    ctx: Context, gpus: int, capacity: float, settings: BenchSettings, counter: Counter
) -> AlpCheck | None:
    """Predicted against simulated throughput of Scepsy's maximum-throughput plan: the work
    rate (``measure.work_rate``) of a run offered ``settings.overload`` x the prediction."""
    try:
        plan = SYSTEMS["scepsy"](ctx, gpus, capacity)
    except InfeasibleError:
        return None
    predicted = ctx.throughput_of(ctx.predict(plan.allocation, capacity))
    load = load_at(ctx, predicted * settings.overload, SEED_OVERLOAD, settings)
    result = ctx.serve(plan, poisson(load.rate, load.requests, load.seed), gpus=gpus, record=True)
    counter.calls += result.calls
    simulated = work_rate(result, measure(result, load.rate, settings.measure))
    return AlpCheck(load.rate, describe(plan.allocation), predicted, simulated)


def run_oracle(
    ctx: Context,
    gpus: int,
    scepsy: Sequence[Point],
    loads: Mapping[float, Load],
    settings: BenchSettings,
    say: Progress,
    counter: Counter,
) -> OracleResult | None:
    """The best simulated allocation at a moderate rate (module docstring); ``loads`` are the
    grid's loads by rate."""
    peak = max((p.rate for p in scepsy if p.sustainable), default=0.0)
    usable = [p for p in scepsy if p.sustainable and p.rate in loads]
    usable = [p for p in usable if p.rate <= settings.oracle_load * peak]
    if not usable:
        return None
    point = usable[-1]
    rate = point.rate
    k = settings.fraction_unit
    candidates = list(baselines.oracle_candidates(sorted(ctx.models), gpus, k, ctx.fits))
    demand = ctx.loads(rate)
    covered = [a for a in candidates if _covers(ctx, a, demand)]
    if not covered or len(covered) > settings.oracle_max_candidates:
        say(f"{ctx.workflow.name} oracle: {len(covered)} candidates, skipped")
        return None
    finalists = select(ctx, gpus, rate, covered, settings, counter)
    finals = [
        run_point(ctx, Setup("oracle", a), loads[rate], gpus, settings, counter) for a in finalists
    ]
    finals = [f for f in finals if f.sustainable]
    if not finals:
        return None
    best = min(finals, key=lambda f: (f.mean_latency, f.allocation))
    say(f"{ctx.workflow.name} oracle @ {rate:.3g} req/s: best of {len(covered)}: {best.allocation}")
    return OracleResult(
        rate=rate,
        candidates=len(candidates),
        simulated=len(covered),
        allocation=best.allocation,
        latency=best.mean_latency,
        scepsy_allocation=point.allocation,
        scepsy_latency=point.mean_latency,
    )


def select(
    ctx: Context,
    gpus: int,
    rate: float,
    candidates: list[dict[str, Allocation]],
    settings: BenchSettings,
    counter: Counter,
    keep: int = 3,
) -> list[dict[str, Allocation]]:
    """Successive halving (module docstring): the ``keep`` best candidates, sustainable ones
    first, then by mean latency."""
    # rankings only: short runs, not held to the settling rule of the curves
    once = replace(settings, doublings=0, measure=replace(settings.measure, min_span_latencies=0))
    requests = settings.oracle_requests
    alive = candidates
    for round_ in range(8):
        load = Load(rate, requests, settings.seed + SEED_SELECTION + round_)
        scored = []
        for alloc in alive:
            p = run_point(ctx, Setup("oracle", alloc), load, gpus, once, counter)
            scored.append((not p.sustainable, p.mean_latency, describe(alloc), alloc))
        scored.sort(key=lambda s: (s[0], s[1], s[2]))
        alive = [a for *_, a in scored[: max(keep, len(scored) // 4)]]
        if len(alive) <= keep:
            break
        requests *= 3
    return alive[:keep]


def _covers(
    ctx: Context, allocation: Mapping[str, Allocation], demand: Mapping[str, float]
) -> bool:
    """Whether every LLM's profiled capacity (replicas x saturation rate) exceeds its load."""
    for model, load in demand.items():
        a = allocation[model]
        if a.replicas * ctx.profiles.profile(model, a.tp, a.fraction).saturation_rate <= load:
            return False
    return True


def loaded_stats(
    ctx: Context, gpus: int, scepsy: Sequence[Point], settings: BenchSettings, counter: Counter
) -> WorkflowStats | None:
    """Statistics of a traced run of Scepsy at its highest sustainable rate."""
    sustained = [p for p in scepsy if p.sustainable]
    if not sustained:
        return None
    rate = sustained[-1].rate
    plan = SYSTEMS["scepsy"](ctx, gpus, rate)
    load = load_at(ctx, rate, SEED_LOADED, settings)
    run = ctx.serve(plan, poisson(rate, load.requests, load.seed), record=True, gpus=gpus)
    counter.calls += run.calls
    stats = workflow_stats(Trace(run.trace, run.requests))
    return next(s for s in stats if s.workflow == ctx.workflow.name)


def stability_of(stats: WorkflowStats, source: str) -> Stability:
    shares = tuple((m.model, m.share_mean, m.share_cv) for m in stats.llms)
    return Stability(source, stats.requests, stats.e2e_cv, shares)
