"""The trace format: versioned JSON lines, one record per line.

Two kinds of record share a file (``"kind"`` selects; ``"call"`` is the default):

* **call** - one LLM call of one workflow request, as the router records it::

    {"v": 1, "kind": "call", "workflow": "rag", "request_id": "r1", "call_id": "c1",
     "model": "llama-8b", "start": 10.0, "end": 11.5, "prompt_tokens": 812,
     "completion_tokens": 96, "ttft": 0.04, "status": "ok", "replica": "node1/0"}

  ``start``/``end`` are seconds (epoch or relative; one clock per file). ``ttft`` is null for
  non-streamed calls; ``replica`` is optional. ``status`` is ``ok``, ``error`` or ``cancelled``.

* **request** - optional; the span of one whole workflow request, written by the client that
  drives it (the router sees calls only)::

    {"v": 1, "kind": "request", "workflow": "rag", "request_id": "r1",
     "start": 9.8, "end": 12.4, "status": "ok"}

  Without it, a request's end-to-end span runs from its first call's start to its last call's
  end, so tool time before the first and after the last call is invisible.

Calls that carry no workflow tag are recorded with ``workflow = UNTAGGED_WORKFLOW`` and
``request_id = call_id``: single-call requests. Requests are identified by
``(workflow, request_id)``. Unknown fields are rejected (a writer that adds fields bumps ``v``);
blank lines are skipped. Every validation error names the source, the line and the field.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from services.core.errors import InvalidInputError

TRACE_VERSION = 1
UNTAGGED_WORKFLOW = "untagged"
STATUSES: tuple[str, ...] = ("ok", "error", "cancelled")

Status = Literal["ok", "error", "cancelled"]


@dataclass(frozen=True, slots=True)
class TraceCall:
    """One LLM call. ``end >= start``; token counts are >= 0; ``ttft`` fits inside the call."""

    workflow: str
    request_id: str
    call_id: str
    model: str
    start: float
    end: float
    prompt_tokens: int
    completion_tokens: int
    ttft: float | None = None
    status: Status = "ok"
    replica: str | None = None

    @property
    def duration(self) -> float:
        return self.end - self.start


@dataclass(frozen=True, slots=True)
class TraceRequest:
    """The span of one workflow request as seen by its client (``end >= start``)."""

    workflow: str
    request_id: str
    start: float
    end: float
    status: Status = "ok"


@dataclass(frozen=True, slots=True)
class Trace:
    """A parsed trace: calls and request records in file order."""

    calls: tuple[TraceCall, ...]
    requests: tuple[TraceRequest, ...] = ()


_CALL_FIELDS = frozenset(
    {
        "v",
        "kind",
        "workflow",
        "request_id",
        "call_id",
        "model",
        "start",
        "end",
        "prompt_tokens",
        "completion_tokens",
        "ttft",
        "status",
        "replica",
    }
)
_REQUEST_FIELDS = frozenset({"v", "kind", "workflow", "request_id", "start", "end", "status"})


class _Line:
    """Field readers for one record; every error names source, line and field."""

    def __init__(self, where: str, record: Mapping[str, Any]) -> None:
        self.where = where
        self.record = record

    def fail(self, name: str, problem: str) -> InvalidInputError:
        return InvalidInputError(f"{self.where}: field {name!r}: {problem}")

    def text(self, name: str) -> str:
        value = self.raw(name)
        if not isinstance(value, str) or not value:
            raise self.fail(name, f"must be a non-empty string, got {value!r}")
        return value

    def number(self, name: str) -> float:
        value = self.raw(name)
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise self.fail(name, f"must be a number, got {value!r}")
        if not math.isfinite(value):
            raise self.fail(name, f"must be finite, got {value!r}")
        return float(value)

    def count(self, name: str) -> int:
        value = self.raw(name)
        if isinstance(value, bool) or not isinstance(value, int):
            raise self.fail(name, f"must be an integer, got {value!r}")
        if value < 0:
            raise self.fail(name, f"must be >= 0, got {value}")
        return value

    def status(self) -> Status:
        value = self.record.get("status", "ok")
        if value not in STATUSES:
            raise self.fail("status", f"must be one of {', '.join(STATUSES)}, got {value!r}")
        status: Status = value
        return status

    def span(self) -> tuple[float, float]:
        start, end = self.number("start"), self.number("end")
        if end < start:
            raise self.fail("end", f"must be >= start ({start!r}), got {end!r}")
        return start, end

    def raw(self, name: str) -> Any:
        if name not in self.record:
            raise self.fail(name, "missing")
        return self.record[name]


def _parse_call(line: _Line) -> TraceCall:
    # Fields are read in declaration order so the first problem on a line is the one reported.
    workflow, request_id = line.text("workflow"), line.text("request_id")
    call_id, model = line.text("call_id"), line.text("model")
    start, end = line.span()
    prompt_tokens, completion_tokens = line.count("prompt_tokens"), line.count("completion_tokens")
    ttft = None if line.record.get("ttft") is None else line.number("ttft")
    # A small tolerance: ttft and the span may come from different clock reads.
    if ttft is not None and not 0.0 <= ttft <= end - start + 1e-6:
        raise line.fail(
            "ttft", f"must lie in [0, end - start] ([0, {end - start:g}]), got {ttft:g}"
        )
    status = line.status()
    replica = line.record.get("replica")
    if replica is not None and (not isinstance(replica, str) or not replica):
        raise line.fail("replica", f"must be a non-empty string or null, got {replica!r}")
    return TraceCall(
        workflow=workflow,
        request_id=request_id,
        call_id=call_id,
        model=model,
        start=start,
        end=end,
        prompt_tokens=prompt_tokens,
        completion_tokens=completion_tokens,
        ttft=ttft,
        status=status,
        replica=replica,
    )


def _parse_request(line: _Line) -> TraceRequest:
    workflow, request_id = line.text("workflow"), line.text("request_id")
    start, end = line.span()
    return TraceRequest(workflow, request_id, start, end, status=line.status())


def parse_trace_lines(lines: Iterable[str], source: str = "trace") -> Trace:
    """Parse JSON lines into a ``Trace``; raise ``InvalidInputError`` naming line and field.

    Also rejects a call id repeated inside one request and a second request record for the same
    request, since either would double-count time.
    """
    calls: list[TraceCall] = []
    requests: list[TraceRequest] = []
    seen_calls: dict[tuple[str, str, str], int] = {}
    seen_requests: dict[tuple[str, str], int] = {}
    for number, raw in enumerate(lines, start=1):
        if not raw.strip():
            continue
        where = f"{source} line {number}"
        try:
            record = json.loads(raw)
        except json.JSONDecodeError as exc:
            raise InvalidInputError(f"{where}: not valid JSON: {exc.msg}") from None
        except RecursionError:
            raise InvalidInputError(f"{where}: nested too deeply to be a trace record") from None
        if not isinstance(record, dict):
            raise InvalidInputError(f"{where}: must be a JSON object, got {type(record).__name__}")
        line = _Line(where, record)
        version = line.raw("v")
        if type(version) is not int or version != TRACE_VERSION:
            raise line.fail("v", f"unsupported trace version {version!r} (supported: 1)")
        kind = record.get("kind", "call")
        if kind not in ("call", "request"):
            raise line.fail("kind", f"must be 'call' or 'request', got {kind!r}")
        allowed = _CALL_FIELDS if kind == "call" else _REQUEST_FIELDS
        unknown = sorted(set(record) - allowed)
        if unknown:
            raise line.fail(unknown[0], f"unknown for a {kind} record (allowed: {sorted(allowed)})")
        if kind == "call":
            call = _parse_call(line)
            key = (call.workflow, call.request_id, call.call_id)
            if key in seen_calls:
                raise line.fail(
                    "call_id",
                    f"duplicate {call.call_id!r} in request {call.workflow}/{call.request_id} "
                    f"(first at line {seen_calls[key]})",
                )
            seen_calls[key] = number
            calls.append(call)
        else:
            request = _parse_request(line)
            rkey = (request.workflow, request.request_id)
            if rkey in seen_requests:
                raise line.fail(
                    "request_id",
                    f"duplicate request record {request.workflow}/{request.request_id} "
                    f"(first at line {seen_requests[rkey]})",
                )
            seen_requests[rkey] = number
            requests.append(request)
    return Trace(calls=tuple(calls), requests=tuple(requests))


def read_trace(path: str | Path) -> Trace:
    """Read and validate a trace file; unreadable files raise ``InvalidInputError`` too."""
    try:
        with open(path, encoding="utf-8") as handle:
            return parse_trace_lines(handle, source=str(path))
    except OSError as exc:
        raise InvalidInputError(f"trace {str(path)!r}: cannot read: {exc.strerror}") from None
    except UnicodeDecodeError as exc:
        raise InvalidInputError(f"trace {str(path)!r}: not UTF-8 text: {exc.reason}") from None


def record_dict(record: TraceCall | TraceRequest) -> dict[str, Any]:
    """The JSON object of one record (optional fields left out when unset)."""
    if isinstance(record, TraceRequest):
        return {
            "v": TRACE_VERSION,
            "kind": "request",
            "workflow": record.workflow,
            "request_id": record.request_id,
            "start": record.start,
            "end": record.end,
            "status": record.status,
        }
    out: dict[str, Any] = {
        "v": TRACE_VERSION,
        "kind": "call",
        "workflow": record.workflow,
        "request_id": record.request_id,
        "call_id": record.call_id,
        "model": record.model,
        "start": record.start,
        "end": record.end,
        "prompt_tokens": record.prompt_tokens,
        "completion_tokens": record.completion_tokens,
        "ttft": record.ttft,
        "status": record.status,
    }
    if record.replica is not None:
        out["replica"] = record.replica
    return out


def dumps(record: TraceCall | TraceRequest) -> str:
    """One trace line (no trailing newline); ``parse_trace_lines`` reads it back unchanged."""
    return json.dumps(record_dict(record), separators=(",", ":"))


def write_trace(
    path: str | Path, calls: Iterable[TraceCall], requests: Iterable[TraceRequest] = ()
) -> None:
    """Write calls, then request records, one per line."""
    with open(path, "w", encoding="utf-8") as handle:
        for call in calls:
            handle.write(dumps(call) + "\n")
        for request in requests:
            handle.write(dumps(request) + "\n")
