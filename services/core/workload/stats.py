"""Workflow statistics from a trace: the aggregate view the ALP is built from (``docs/design.md``,
Definitions).

Per workflow and per LLM m:

* ``n`` - mean number of calls to m per request (requests that never call m count as 0);
* ``p`` - time-weighted concurrency: sum of m's call durations / sum over requests of busy_m,
  where busy_m(r) is the length of the union of r's calls to m;
* ``share`` - busy_m(r) / sum over m' of busy_m'(r); its mean and coefficient of variation (CV)
  across requests, to compare with the CV of end-to-end latency;
* token lengths (prompt, completion) and a bounded, deterministic sample of (prompt, completion)
  pairs, to build the request mix m is profiled with.

Per workflow: end-to-end latency (mean, CV); tool time (end-to-end minus the union of all LLM
intervals); pairwise overlap of LLMs inside a request, and **stages**: groups of LLMs observed
active at the same time (connected components of the graph whose edges are pairs overlapping in at
least ``overlap_threshold`` of the requests calling both). Stages are ordered by when their first
call starts, on average, relative to the request start.

Only ``ok`` calls count for timing and tokens; ``error`` and ``cancelled`` calls are counted
separately. A request whose request record is not ``ok``, or that has no ``ok`` call and no
request record, is a failed request and is left out of timing.
"""

from __future__ import annotations

import dataclasses
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from itertools import combinations
from typing import Any

import numpy as np

from services.core.errors import InvalidInputError
from services.core.workload.trace import Trace, TraceCall, TraceRequest

Interval = tuple[float, float]

DEFAULT_OVERLAP_THRESHOLD = 0.5
DEFAULT_SAMPLE_SIZE = 1000


@dataclass(frozen=True, slots=True)
class TokenStats:
    """A token-length distribution (linear-interpolated percentiles; zeros when empty)."""

    mean: float
    p50: float
    p90: float
    p99: float
    max: float


@dataclass(frozen=True, slots=True)
class LlmStats:
    """One LLM inside one workflow."""

    model: str
    calls: int  # ok calls in counted requests
    errors: int  # calls with status "error" (all requests)
    cancelled: int  # calls with status "cancelled" (all requests)
    n: float  # mean calls per request
    p: float  # time-weighted concurrency while active (>= 1)
    busy_mean: float  # s, mean busy_m per request (0 for requests not calling m)
    share_mean: float
    share_cv: float
    latency_mean: float  # s, mean call duration
    ttft_mean: float | None  # s, over calls that report it; None when none do
    prompt: TokenStats
    completion: TokenStats
    sample: tuple[tuple[int, int], ...]  # (prompt, completion) pairs, at most sample_size


@dataclass(frozen=True, slots=True)
class PairOverlap:
    """How two LLMs of one workflow overlap inside requests that call both."""

    models: tuple[str, str]  # sorted
    co_requests: int  # requests calling both
    overlap_fraction: float  # share of co_requests where their busy intervals intersect
    mean_overlap: float  # mean over co_requests of overlap time / smaller busy time


@dataclass(frozen=True, slots=True)
class WorkflowStats:
    workflow: str
    requests: int  # counted requests
    failed_requests: int
    request_records: int  # counted requests whose span came from a request record
    e2e_mean: float  # s
    e2e_cv: float
    tool_time_mean: float  # s per request
    tool_share: float  # total tool time / total end-to-end time
    llms: tuple[LlmStats, ...]  # sorted by model
    overlaps: tuple[PairOverlap, ...]  # pairs with co_requests > 0, sorted
    stages: tuple[tuple[str, ...], ...]  # a partition of the models, in execution order

    def llm(self, model: str) -> LlmStats:
        """The stats of ``model``; ``KeyError`` when the workflow never calls it."""
        for entry in self.llms:
            if entry.model == model:
                return entry
        raise KeyError(model)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (tuples become lists)."""
        return dataclasses.asdict(self)


def merge_intervals(intervals: Iterable[Interval]) -> list[Interval]:
    """Sorted, disjoint intervals covering the same points (touching intervals merge)."""
    merged: list[Interval] = []
    for start, end in sorted(intervals):
        if merged and start <= merged[-1][1]:
            if end > merged[-1][1]:
                merged[-1] = (merged[-1][0], end)
        else:
            merged.append((start, end))
    return merged


def covered(merged: Sequence[Interval]) -> float:
    """Total length of disjoint intervals."""
    return sum(end - start for start, end in merged)


def intersection(a: Sequence[Interval], b: Sequence[Interval]) -> float:
    """Length of the intersection of two merged interval lists (two-pointer sweep)."""
    i = j = 0
    total = 0.0
    while i < len(a) and j < len(b):
        lo = max(a[i][0], b[j][0])
        hi = min(a[i][1], b[j][1])
        if hi > lo:
            total += hi - lo
        if a[i][1] < b[j][1]:
            i += 1
        else:
            j += 1
    return total


@dataclass(frozen=True, slots=True)
class _Request:
    """One counted request, reduced to what the statistics need."""

    start: float
    end: float
    from_record: bool
    busy: dict[str, list[Interval]]  # model -> merged intervals
    durations: dict[str, float]  # model -> sum of call durations
    counts: dict[str, int]  # model -> ok calls
    first_start: dict[str, float]  # model -> offset of its first call from the request start
    llm_union: float  # length of the union of all LLM intervals


def _reduce_request(calls: Sequence[TraceCall], record: TraceRequest | None) -> _Request:
    by_model: dict[str, list[Interval]] = defaultdict(list)
    for call in calls:
        by_model[call.model].append((call.start, call.end))
    starts = [c.start for c in calls]
    ends = [c.end for c in calls]
    # A client's request record may disagree slightly with the router's clock: take the hull.
    if record is not None:
        starts.append(record.start)
        ends.append(record.end)
    start, end = min(starts), max(ends)
    return _Request(
        start=start,
        end=end,
        from_record=record is not None,
        busy={m: merge_intervals(iv) for m, iv in by_model.items()},
        durations={m: sum(e - s for s, e in iv) for m, iv in by_model.items()},
        counts={m: len(iv) for m, iv in by_model.items()},
        first_start={m: min(s for s, _ in iv) - start for m, iv in by_model.items()},
        llm_union=covered(merge_intervals(iv for ivs in by_model.values() for iv in ivs)),
    )


def _cv(values: Sequence[float]) -> float:
    """Population coefficient of variation; 0 for empty or zero-mean data."""
    if not values:
        return 0.0
    mean = float(np.mean(values))
    return float(np.std(values)) / mean if mean > 0 else 0.0


def _mean(values: Sequence[float]) -> float:
    return float(np.mean(values)) if values else 0.0


def token_stats(values: Sequence[int]) -> TokenStats:
    if not values:
        return TokenStats(0.0, 0.0, 0.0, 0.0, 0.0)
    arr = np.asarray(values, dtype=float)
    p50, p90, p99 = (float(x) for x in np.percentile(arr, [50, 90, 99]))
    return TokenStats(float(arr.mean()), p50, p90, p99, float(arr.max()))


def _sample(calls: Sequence[TraceCall], size: int) -> tuple[tuple[int, int], ...]:
    # Evenly spaced over calls in time order: deterministic, independent of file order, and it
    # keeps the shape of the distribution when the trace is larger than the sample.
    ordered = sorted(calls, key=lambda c: (c.start, c.request_id, c.call_id))
    if len(ordered) > size:
        ordered = [ordered[i * len(ordered) // size] for i in range(size)]
    return tuple((c.prompt_tokens, c.completion_tokens) for c in ordered)


def _llm_stats(
    model: str,
    requests: Sequence[_Request],
    ok_calls: Sequence[TraceCall],
    all_calls: Sequence[TraceCall],
    sample_size: int,
) -> LlmStats:
    busy = [covered(r.busy.get(model, ())) for r in requests]
    total_busy = sum(busy)
    total_duration = sum(r.durations.get(model, 0.0) for r in requests)
    # share_m(r) is undefined for a request whose LLM calls all took zero time.
    shares = [
        b / sum(covered(iv) for iv in r.busy.values())
        for b, r in zip(busy, requests, strict=True)
        if any(covered(iv) > 0 for iv in r.busy.values())
    ]
    ttfts = [c.ttft for c in ok_calls if c.ttft is not None]
    return LlmStats(
        model=model,
        calls=len(ok_calls),
        errors=sum(c.status == "error" for c in all_calls),
        cancelled=sum(c.status == "cancelled" for c in all_calls),
        n=len(ok_calls) / len(requests) if requests else 0.0,
        p=total_duration / total_busy if total_busy > 0 else 1.0,
        busy_mean=_mean(busy),
        share_mean=_mean(shares),
        share_cv=_cv(shares),
        latency_mean=_mean([c.duration for c in ok_calls]),
        ttft_mean=_mean(ttfts) if ttfts else None,
        prompt=token_stats([c.prompt_tokens for c in ok_calls]),
        completion=token_stats([c.completion_tokens for c in ok_calls]),
        sample=_sample(ok_calls, sample_size),
    )


def _overlaps(models: Sequence[str], requests: Sequence[_Request]) -> tuple[PairOverlap, ...]:
    out: list[PairOverlap] = []
    for a, b in combinations(sorted(models), 2):
        both = [r for r in requests if a in r.busy and b in r.busy]
        if not both:
            continue
        hits = 0
        ratios: list[float] = []
        for r in both:
            shared = intersection(r.busy[a], r.busy[b])
            hits += shared > 0
            smaller = min(covered(r.busy[a]), covered(r.busy[b]))
            ratios.append(shared / smaller if smaller > 0 else 0.0)
        out.append(PairOverlap((a, b), len(both), hits / len(both), _mean(ratios)))
    return tuple(out)


def _stages(
    models: Sequence[str],
    overlaps: Sequence[PairOverlap],
    requests: Sequence[_Request],
    threshold: float,
) -> tuple[tuple[str, ...], ...]:
    parent = {m: m for m in models}

    def root(m: str) -> str:
        while parent[m] != m:
            parent[m] = parent[parent[m]]
            m = parent[m]
        return m

    for pair in overlaps:
        if pair.overlap_fraction >= threshold:
            ra, rb = root(pair.models[0]), root(pair.models[1])
            if ra != rb:
                parent[max(ra, rb)] = min(ra, rb)
    groups: dict[str, list[str]] = defaultdict(list)
    for m in sorted(models):
        groups[root(m)].append(m)
    offset = {m: _mean([r.first_start[m] for r in requests if m in r.first_start]) for m in models}
    ordered = sorted(groups.values(), key=lambda g: (min(offset[m] for m in g), g[0]))
    return tuple(tuple(g) for g in ordered)


def _one_workflow(
    name: str,
    calls: Sequence[TraceCall],
    records: dict[str, TraceRequest],
    overlap_threshold: float,
    sample_size: int,
) -> WorkflowStats:
    ok_by_request: dict[str, list[TraceCall]] = defaultdict(list)
    ids: set[str] = set(records)
    for call in calls:
        ids.add(call.request_id)
        if call.status == "ok":
            ok_by_request[call.request_id].append(call)
    counted: list[str] = []
    for rid in sorted(ids):
        record = records.get(rid)
        failed = record.status != "ok" if record is not None else not ok_by_request.get(rid)
        if not failed:
            counted.append(rid)
    requests = [_reduce_request(ok_by_request.get(rid, []), records.get(rid)) for rid in counted]
    counted_set = set(counted)
    models = sorted({c.model for c in calls})
    llms = tuple(
        _llm_stats(
            m,
            requests,
            [c for c in calls if c.model == m and c.status == "ok" and c.request_id in counted_set],
            [c for c in calls if c.model == m],
            sample_size,
        )
        for m in models
    )
    e2e = [r.end - r.start for r in requests]
    tool = [r.end - r.start - r.llm_union for r in requests]
    overlaps = _overlaps(models, requests)
    return WorkflowStats(
        workflow=name,
        requests=len(requests),
        failed_requests=len(ids) - len(requests),
        request_records=sum(r.from_record for r in requests),
        e2e_mean=_mean(e2e),
        e2e_cv=_cv(e2e),
        tool_time_mean=_mean(tool),
        tool_share=sum(tool) / sum(e2e) if sum(e2e) > 0 else 0.0,
        llms=llms,
        overlaps=overlaps,
        stages=_stages(models, overlaps, requests, overlap_threshold),
    )


def workflow_stats(
    trace: Trace,
    *,
    overlap_threshold: float = DEFAULT_OVERLAP_THRESHOLD,
    sample_size: int = DEFAULT_SAMPLE_SIZE,
) -> tuple[WorkflowStats, ...]:
    """Statistics of every workflow in ``trace``, sorted by workflow name."""
    if not 0 < overlap_threshold <= 1:
        raise InvalidInputError(f"overlap_threshold: must be in (0, 1], got {overlap_threshold}")
    if sample_size < 1:
        raise InvalidInputError(f"sample_size: must be >= 1, got {sample_size}")
    calls: dict[str, list[TraceCall]] = defaultdict(list)
    records: dict[str, dict[str, TraceRequest]] = defaultdict(dict)
    for call in trace.calls:
        calls[call.workflow].append(call)
    for record in trace.requests:
        records[record.workflow][record.request_id] = record
    names = sorted(set(calls) | set(records))
    return tuple(
        _one_workflow(w, calls[w], records[w], overlap_threshold, sample_size) for w in names
    )
