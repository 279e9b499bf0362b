"""One point of a throughput-latency curve, measured from a simulation run.

A run offers requests at ``rate`` (Poisson) and serves them all. Requests arriving during the
warm-up (an empty cluster, an autoscaler still reacting) are served but not measured; the
warm-up lasts ``warmup_share`` of the arrival span, or ``warmup_latencies`` median request
latencies of this run when that is longer (queues need a few latencies to settle), but at most
``MAX_WARMUP_SHARE`` of the span (thresholds in ``MeasureConfig``). Over the measurement window
[end of the warm-up, last arrival], of length W:

- **throughput** (achieved) = requests completed inside the window / W;
- **completion ratio** = requests completed inside the window / requests that arrived inside it;
- **backlog growth** = the least-squares slope of the number of requests in the system over the
  window (sampled at ``BACKLOG_SAMPLES`` instants), divided by the arrival rate in the window.
  A system that keeps up holds a steady backlog (zero up to noise); one that falls behind piles
  up rate - capacity requests per second, a growth of 1 - capacity / rate. Unlike the
  completion ratio, which compares the two ends of the window, the slope uses all of it;
- the run is **settled** when its arrival span is at least ``min_span_latencies`` median
  latencies: shorter runs cannot tell a slow but steady system from one falling behind;
- the point is **sustainable** when the run is settled and the backlog growth is at most
  ``max_backlog_growth``;
- **several workflows** at once (a ``workflows.Mix``: ``groups`` gives each request's part):
  each part's backlog growth over its own requests and arrival rate, held to the bound scaled
  by its noise: a part of share s of the requests has 1/sqrt(s) the whole's relative noise, so
  the point's backlog growth is the largest of sqrt(s) x the part's growth. The median latency
  that sizes the warm-up and the settling is the slowest part's. Counted over all requests a
  part of few but long requests falls behind unseen: co-serving (90% RAG, 10% beam search whose
  requests take 40-150 s against RAG's 5-10 s) on 4 GPUs, ``generator 2x tp1, prm 1x tp1,
  reranker 1x tp1`` at 3.83 req/s grew +1.0% by count (sustainable) while beam's own backlog
  grew +20% (2,175 requests), +23% (17,400) and +27% (34,800), its mean latency 151 s, 805 s,
  1,720 s. The bound needs the scaling: at 2.68 req/s beam's growth was -6.0%, -1.2%, +2.6%,
  +0.1%, -0.3% over 1, 2, 4, 8 and 16 x 2,175 requests (its mean latency 54-65 s throughout):
  steady, and a few hundred of its requests put its growth within +-6%;
- **run throughput** = all requests / (last finish - first arrival): under overload the cluster
  works without pause until the backlog is gone, so this is its capacity (the requests that a
  processor-sharing-like system leaves half done inside the window finish in the drain);
- **work rate** (``work_rate``, from a run's trace): request-equivalents served per second in
  the window: per LLM, its calls that ended inside the window per second over its calls per
  request in the run; the smallest over the LLMs. Under overload that is the bottleneck's
  capacity, where the completion rate under-states a workflow of many rounds (beam search: a
  request's rounds queue behind those of every request in flight, so the backlog's half-done
  work grows and completions lag the work done).

Latency (mean, p50, p99) is over the measured requests, arrival to finish.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from services.core.errors import InvalidInputError
from services.core.perf.model import FloatArray
from services.core.sim.simulator import SimResult

IntArray = npt.NDArray[np.int64]

MAX_WARMUP_SHARE = 0.6
AMBIGUOUS = 3.0  # backlog growth up to this x the steady-state bound: run longer to decide
UNSETTLED = 10.0  # ... up to this x when the run was too short for its latencies


@dataclass(frozen=True, slots=True)
class MeasureConfig:
    """The thresholds of the module docstring."""

    warmup_share: float = 0.2
    warmup_latencies: float = 3.0
    max_backlog_growth: float = 0.02  # strict steady state (backlog growth <= 2%)
    min_span_latencies: float = 10.0

    def __post_init__(self) -> None:
        if not 0 <= self.warmup_share <= MAX_WARMUP_SHARE:
            raise InvalidInputError(
                f"warmup_share: must be in [0, {MAX_WARMUP_SHARE}], got {self.warmup_share}"
            )


@dataclass(frozen=True, slots=True)
class Point:
    """One system at one offered rate (requests/s); latencies in seconds."""

    rate: float
    requests: int  # measured
    throughput: float
    completion_ratio: float
    backlog_growth: float
    settled: bool
    mean_latency: float
    p50_latency: float
    p99_latency: float
    sustainable: bool
    allocation: str = ""  # compact description of what served it
    gpus: float = 0.0  # GPUs the allocation uses
    predicted_latency: float | None = None  # the ALP's, for plans that come with one
    refined_latency: float | None = None  # the refinement's simulated latency, when refined
    run_throughput: float = 0.0  # all requests / (last finish - first arrival)
    calls: int = 0  # LLM calls simulated (all requests)
    part_growth: tuple[float, ...] = ()  # per part of a mix (``groups``), its backlog growth
    part_share: tuple[float, ...] = ()  # ... and its share of the measured requests

    @property
    def weighted_growth(self) -> tuple[float, ...]:
        """Per part, sqrt(share) x its growth (module docstring)."""
        return tuple(g * s**0.5 for g, s in zip(self.part_growth, self.part_share, strict=True))


def measure(
    result: SimResult,
    rate: float,
    config: MeasureConfig | None = None,
    groups: IntArray | None = None,
) -> Point:
    """The curve point of ``result`` (module docstring); ``groups``: per request (arrival
    order), the index of its part when several workflows were served. Needs two requests
    arriving apart."""
    cfg = config or MeasureConfig()
    arrival, n = result.arrival, len(result.arrival)
    span = float(arrival[-1] - arrival[0]) if n else 0.0
    if n < 2 or span <= 0:
        raise InvalidInputError("measure: need at least 2 requests arriving at different times")
    if groups is not None and len(groups) != n:
        raise InvalidInputError(f"measure: groups has {len(groups)} entries for {n} requests")
    median = float(np.median(result.latency))
    ids = np.unique(groups) if groups is not None else np.empty(0, np.int64)
    if groups is not None:
        median = max(float(np.median(result.latency[groups == g])) for g in ids)
    warm = min(max(cfg.warmup_share * span, cfg.warmup_latencies * median), MAX_WARMUP_SHARE * span)
    first = min(int(np.searchsorted(arrival, arrival[0] + warm)), n - 2)
    start, stop = float(arrival[first]), float(arrival[-1])
    completed = int(np.count_nonzero((result.finish >= start) & (result.finish <= stop)))
    latency = result.latency[first:]
    parts: tuple[float, ...] = ()
    shares: tuple[float, ...] = ()
    if groups is None:
        growth = backlog_growth(arrival, result.finish, start, stop, (n - first) / (stop - start))
    else:
        parts = part_growth(arrival, result.finish, groups, start, stop)
        shares = tuple(float(np.mean(groups[first:] == g)) for g in ids)
        growth = max(g * s**0.5 for g, s in zip(parts, shares, strict=True))
    settled = span >= cfg.min_span_latencies * median
    return Point(
        rate=rate,
        requests=n - first,
        throughput=completed / (stop - start),
        completion_ratio=completed / (n - first),
        backlog_growth=growth,
        settled=settled,
        mean_latency=float(latency.mean()),
        p50_latency=float(np.percentile(latency, 50)),
        p99_latency=float(np.percentile(latency, 99)),
        sustainable=settled and growth <= cfg.max_backlog_growth,
        run_throughput=n / (float(result.finish.max()) - float(arrival[0])),
        calls=result.calls,
        part_growth=parts,
        part_share=shares,
    )


def clear(point: Point, bound: float, unsettled: float | None = None) -> bool:
    """Whether ``point``'s verdict (steady state: backlog growth at most ``bound``) needs no
    longer run: not when the run was too short for its latencies and its backlog grew by less
    than ``unsettled`` (default ``UNSETTLED`` x ``bound``: a queue still filling), nor when it
    grew by more than ``bound`` but less than ``AMBIGUOUS`` x ``bound`` (within a short run's
    noise), nor when it (or a part of a mix) shrank by more than ``bound`` (a burst early in the
    window still draining). ``services.core.sim.runs`` and ``scoring`` run such points again,
    longer."""
    if point.sustainable:
        return min(point.weighted_growth, default=point.backlog_growth) >= -bound
    if not point.settled:
        return point.backlog_growth > (UNSETTLED * bound if unsettled is None else unsettled)
    return point.backlog_growth > AMBIGUOUS * bound


def work_rate(result: SimResult, point: Point) -> float:
    """Request-equivalents per second served in ``point``'s measurement window (module
    docstring). Needs the run's trace (``SimOptions.record``)."""
    if not result.trace:
        raise InvalidInputError("work_rate: the run has no trace (simulate with record=True)")
    n = len(result.arrival)
    start, stop = float(result.arrival[n - point.requests]), float(result.arrival[-1])
    ended: dict[str, int] = {}
    for call in result.trace:
        if start <= call.end <= stop:
            ended[call.model] = ended.get(call.model, 0) + 1
    return min(
        ended.get(model, 0) / (stop - start) / (calls / n)
        for model, calls in result.calls_by_model.items()
        if calls > 0
    )


BACKLOG_SAMPLES = 256


def part_growth(
    arrival: FloatArray, finish: FloatArray, groups: IntArray, start: float, stop: float
) -> tuple[float, ...]:
    """Per part (``groups``' values, ascending), the backlog growth of its own requests over
    [start, stop] (0 for a part with fewer than two arrivals there)."""
    out = []
    for g in np.unique(groups):
        mine = groups == g
        arrived = arrival[mine]
        inside = int(np.count_nonzero((arrived >= start) & (arrived <= stop)))
        if inside < 2:
            out.append(0.0)
            continue
        out.append(backlog_growth(arrived, finish[mine], start, stop, inside / (stop - start)))
    return tuple(out)


def backlog_growth(
    arrival: FloatArray, finish: FloatArray, start: float, stop: float, arrival_rate: float
) -> float:
    """Least-squares slope of requests in the system over [start, stop] / ``arrival_rate``.

    ``arrival`` must be sorted. In the system at t: arrived at or before t, not finished by t.
    """
    t = np.linspace(start, stop, BACKLOG_SAMPLES)
    done = np.sort(finish)
    inside = np.searchsorted(arrival, t, side="right") - np.searchsorted(done, t, side="right")
    centred = t - t.mean()
    slope = float(np.dot(centred, inside - inside.mean()) / np.dot(centred, centred))
    return slope / arrival_rate
