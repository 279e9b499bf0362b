"""A sliding window over the router's trace, and what the loop reads from it per workflow.

``TraceWindow`` holds the trace records whose end lies in the last ``window_s`` seconds, each
call once (the router writes at least once, so a record may arrive twice). ``observe`` reduces
it to one ``WorkflowWindow`` per workflow: the request rate, and the statistics the ALP is built
from (``services.core.workload.stats``: n_m, p_m, time shares, token mix, end-to-end latency).

**Rate.** Requests are counted by the start of their first call, so a request is counted once
however many calls it makes. The rate is the count divided by the time from the first counted
start to now: over a full window of steady traffic that is the window's length, and for a
workflow that only began (or came back from idle) a few seconds ago it is those seconds, not the
window, so a ramp-up does not read as a rate far below the plan. A workflow with fewer than
``min_requests`` requests in the window is *idle*: too few to judge, it never counts as drift.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace

from services.core.workload.stats import WorkflowStats, workflow_stats
from services.core.workload.trace import Trace, TraceCall, TraceRequest

Record = TraceCall | TraceRequest
_Key = tuple[str, str, str]  # (workflow, request id, call id; "" for a request record)


def _key(record: Record) -> _Key:
    if isinstance(record, TraceRequest):
        return (record.workflow, record.request_id, "")
    return (record.workflow, record.request_id, record.call_id)


@dataclass(frozen=True, slots=True)
class TraceWindow:
    """The trace records that ended in the last ``window_s`` seconds (immutable: ``add`` and
    ``prune`` return a new window)."""

    window_s: float
    records: tuple[Record, ...] = ()
    seen: frozenset[_Key] = field(default=frozenset())

    def add(self, records: Iterable[Record], now: float) -> TraceWindow:
        """This window with ``records`` added (each at most once) and the old ones dropped."""
        kept = list(self.records)
        seen = set(self.seen)
        cutoff = now - self.window_s
        for record in records:
            key = _key(record)
            if record.end < cutoff or key in seen:
                continue
            seen.add(key)
            kept.append(record)
        return replace(self, records=tuple(kept), seen=frozenset(seen)).prune(now)

    def prune(self, now: float) -> TraceWindow:
        cutoff = now - self.window_s
        if all(r.end >= cutoff for r in self.records):
            return self
        kept = tuple(r for r in self.records if r.end >= cutoff)
        return replace(self, records=kept, seen=frozenset(_key(r) for r in kept))

    @property
    def calls(self) -> tuple[TraceCall, ...]:
        return tuple(r for r in self.records if isinstance(r, TraceCall))


@dataclass(frozen=True, slots=True)
class LlmWindow:
    """One LLM of one workflow in the window."""

    model: str
    n: float  # calls per request
    p: float  # time-weighted concurrency while busy
    share: float  # mean time share
    prompt_tokens: float  # mean
    completion_tokens: float  # mean
    latency_s: float  # mean call duration


@dataclass(frozen=True, slots=True)
class WorkflowWindow:
    """What the window says about one workflow (module docstring)."""

    workflow: str
    requests: int  # requests whose first call started in the window
    rate_rps: float  # requests / s (0 when idle)
    span_s: float  # the time the rate is measured over
    e2e_s: float  # mean end-to-end latency of the window's requests
    failed: int  # failed requests
    llms: tuple[LlmWindow, ...]
    idle: bool  # fewer requests than min_requests: too few to judge

    def llm(self, model: str) -> LlmWindow | None:
        return next((m for m in self.llms if m.model == model), None)


def statistics(window: TraceWindow, now: float) -> dict[str, WorkflowStats]:
    """The window's workflow statistics, by workflow (the costly part of ``observe``: the loop
    refreshes them less often than the rates).

    Only requests that started inside the window and at least a tenth of it ago count: a request
    cut by the window's start, or still running at its end, would show fewer calls than it
    makes."""
    first = _first_starts(window)
    lo, hi = now - window.window_s, now - window.window_s / 10
    kept = {key for key, start in first.items() if lo <= start <= hi}
    calls = tuple(c for c in window.calls if (c.workflow, c.request_id) in kept)
    requests = tuple(
        r
        for r in window.records
        if isinstance(r, TraceRequest) and (r.workflow, r.request_id) in kept
    )
    return {s.workflow: s for s in workflow_stats(Trace(calls, requests))} if calls else {}


def _first_starts(window: TraceWindow) -> dict[tuple[str, str], float]:
    """(workflow, request id) -> the start of its first call in the window."""
    first: dict[tuple[str, str], float] = {}
    for call in window.calls:
        key = (call.workflow, call.request_id)
        first[key] = min(call.start, first.get(key, call.start))
    return first


def observe(
    window: TraceWindow,
    now: float,
    min_requests: int,
    stats: Mapping[str, WorkflowStats] | None = None,
) -> dict[str, WorkflowWindow]:
    """Per workflow (by name), the window's rate and statistics (module docstring); ``stats``
    from ``statistics``, computed now when not given."""
    cutoff = now - window.window_s
    starts: dict[str, list[float]] = defaultdict(list)
    for (workflow, _), start in _first_starts(window).items():
        if start >= cutoff:
            starts[workflow].append(start)
    stats = statistics(window, now) if stats is None else stats
    out: dict[str, WorkflowWindow] = {}
    for name in sorted(set(stats) | set(starts)):
        counted = starts.get(name, [])
        span = now - min(counted) if counted else 0.0
        idle = len(counted) < min_requests or span <= 0
        out[name] = _workflow_window(name, counted, span, idle, stats.get(name))
    return out


def _workflow_window(
    name: str, starts: list[float], span: float, idle: bool, stats: WorkflowStats | None
) -> WorkflowWindow:
    llms = (
        tuple(
            LlmWindow(
                m.model,
                m.n,
                m.p,
                m.share_mean,
                m.prompt.mean,
                m.completion.mean,
                m.latency_mean,
            )
            for m in stats.llms
            if m.calls > 0
        )
        if stats is not None
        else ()
    )
    return WorkflowWindow(
        workflow=name,
        requests=len(starts),
        rate_rps=0.0 if idle else len(starts) / span,
        span_s=span,
        e2e_s=stats.e2e_mean if stats is not None else 0.0,
        failed=stats.failed_requests if stats is not None else 0,
        llms=llms,
        idle=idle,
    )


def window_dict(view: Mapping[str, WorkflowWindow]) -> dict[str, object]:
    """JSON-ready form of ``observe``'s result."""
    return {
        name: {
            "requests": w.requests,
            "rate_rps": round(w.rate_rps, 6),
            "span_s": round(w.span_s, 3),
            "e2e_s": round(w.e2e_s, 6),
            "failed": w.failed,
            "idle": w.idle,
            "llms": {
                m.model: {
                    "n": round(m.n, 4),
                    "p": round(m.p, 4),
                    "share": round(m.share, 4),
                    "prompt_tokens": round(m.prompt_tokens, 1),
                    "completion_tokens": round(m.completion_tokens, 1),
                    "latency_s": round(m.latency_s, 6),
                }
                for m in w.llms
            },
        }
        for name, w in view.items()
    }
