"""One measured simulation run of a plan at a rate (a curve point).

A ``Load`` is a rate, a number of requests and a seed: the Poisson arrivals it gives are the same
for every system, so all of them serve the same requests, and offer exactly the rate
(``arrivals.poisson_at``: a run of 2,870 requests drawn freely offers the rate within +-1.9%, one
standard deviation, which near a peak decides the verdict). ``run_point`` simulates a plan on a
load and measures it (``services.core.sim.measure``; a mix's backlog part by part,
``Context.groups``). It is repeated with twice the requests (the
same draws extended, scaled to the rate), up to ``BenchSettings.doublings`` times, when its verdict
is not clear (``measure.clear``):

- a run too short for its latencies (not settled) whose backlog grew by less than ``UNSETTLED``
  times the steady-state bound (a queue still filling: map-reduce on 4 GPUs at 4.0 req/s, an
  allocation whose capacity is 5.0, grew 10% over 110 s of arrivals at 17 s latencies);
- one whose backlog grew by more than the bound but less than ``AMBIGUOUS`` times it (within the
  noise of a short run: at 7 requests/s a 45 s run's backlog slope wanders by a few per cent);
- one whose backlog shrank by more than the bound (not a steady state either: a burst early in
  the window still draining; composite at 0.29 req/s on 4 GPUs measured 72 s at -10% against
  34 s at 0.24 req/s and 63 s at 0.33).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from services.core.sim.arrivals import poisson_at
from services.core.sim.measure import Point, clear, measure
from services.core.sim.results import BenchSettings
from services.core.sim.scoring import describe
from services.core.sim.systems import Context, Setup


@dataclass(frozen=True, slots=True)
class Load:
    rate: float  # requests/s
    requests: int
    seed: int

    def doubled(self) -> Load:
        return replace(self, requests=2 * self.requests)


class Counter:
    """LLM calls simulated (for the speed figure)."""

    def __init__(self) -> None:
        self.calls = 0


def requests_for(ctx: Context, rate: float, settings: BenchSettings) -> int:
    """Requests of one run at ``rate``: ``rate x duration``, where the duration is at least
    ``latency_multiple`` isolated request latencies, within ``min_requests`` and
    ``max_calls`` LLM calls; and at least the requests the workflow's spread asks for at
    ``run_error`` (within ``spread_calls`` LLM calls)."""
    duration = max(settings.duration, settings.latency_multiple * ctx.isolated_latency)
    per_request = max(ctx.calls_per_request, 1)
    most = max(settings.min_requests, int(settings.max_calls / per_request))
    requests = max(settings.min_requests, min(round(rate * duration), most))
    if settings.run_error is not None:
        spread = ctx.spread_requests(settings.run_error)
        requests = max(requests, min(spread, int(settings.spread_calls / per_request)))
    return requests


def load_at(ctx: Context, rate: float, seed: int, settings: BenchSettings) -> Load:
    return Load(rate, requests_for(ctx, rate, settings), settings.seed + seed)


def run_point(
    ctx: Context,
    plan: Setup,
    load: Load,
    gpus: int,
    settings: BenchSettings,
    counter: Counter,
) -> Point:
    """Simulate ``plan`` on ``load`` and measure it (module docstring)."""
    cfg = settings.measure
    for attempt in range(settings.doublings + 1):
        result = ctx.serve(plan, poisson_at(load.rate, load.requests, load.seed), gpus=gpus)
        counter.calls += result.calls
        point = measure(result, load.rate, cfg, ctx.groups(load.requests))
        if clear(point, cfg.max_backlog_growth):
            break
        if attempt < settings.doublings:
            load = load.doubled()
    predicted = refined = None
    if plan.prediction is not None and plan.planned_rate is None:
        predicted = ctx.latency_of(plan.prediction)
        refined = plan.simulated_latency
    used = sum(a.gpus for a in plan.allocation.values())
    return replace(
        point,
        allocation=describe(plan.allocation),
        gpus=used,
        predicted_latency=predicted,
        refined_latency=refined,
    )
