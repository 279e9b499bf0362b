"""The trace JSONL format: round trips and validation errors naming line and field."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from services.core.errors import InvalidInputError
from services.core.workload.trace import (
    Trace,
    TraceCall,
    TraceRequest,
    dumps,
    parse_trace_lines,
    read_trace,
    write_trace,
)


def call_record(**overrides: Any) -> dict[str, Any]:
    record: dict[str, Any] = {
        "v": 1,
        "workflow": "rag",
        "request_id": "r1",
        "call_id": "c1",
        "model": "llama-8b",
        "start": 1.0,
        "end": 2.5,
        "prompt_tokens": 100,
        "completion_tokens": 20,
        "ttft": 0.1,
        "status": "ok",
    }
    record.update(overrides)
    return record


def line(record: dict[str, Any]) -> str:
    return json.dumps(record)


def test_minimal_call_defaults() -> None:
    record = call_record()
    del record["ttft"], record["status"]
    trace = parse_trace_lines([line(record)])
    assert trace == Trace(
        calls=(TraceCall("rag", "r1", "c1", "llama-8b", 1.0, 2.5, 100, 20),), requests=()
    )
    assert trace.calls[0].status == "ok"
    assert trace.calls[0].ttft is None
    assert trace.calls[0].duration == 1.5


def test_dumps_round_trip_both_kinds() -> None:
    call = TraceCall(
        "rag", "r1", "c1", "m", 0.0, 1.0, 5, 6, ttft=None, status="error", replica="n/0"
    )
    request = TraceRequest("rag", "r1", -0.5, 2.0, status="cancelled")
    trace = parse_trace_lines([dumps(call), "", "   ", dumps(request)])
    assert trace == Trace(calls=(call,), requests=(request,))


def test_write_and_read_file(tmp_path: Path) -> None:
    calls = [
        TraceCall("w", "r1", "a", "m1", 0.0, 1.0, 1, 2, ttft=0.5),
        TraceCall("w", "r1", "b", "m2", 0.5, 1.5, 3, 4),
    ]
    requests = [TraceRequest("w", "r1", 0.0, 2.0)]
    path = tmp_path / "t.jsonl"
    write_trace(path, calls, requests)
    assert read_trace(path) == Trace(calls=tuple(calls), requests=tuple(requests))


def test_missing_file_is_invalid_input(tmp_path: Path) -> None:
    with pytest.raises(InvalidInputError, match=r"nope\.jsonl.*cannot read"):
        read_trace(tmp_path / "nope.jsonl")


def test_error_names_file_and_line(tmp_path: Path) -> None:
    path = tmp_path / "trace.jsonl"
    lines = [line(call_record(call_id=f"c{i}")) for i in range(6)]
    lines.append(line(call_record(call_id="c7", start=3.2, end=1.0)))  # line 7
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(InvalidInputError) as info:
        read_trace(path)
    assert str(info.value) == f"{path} line 7: field 'end': must be >= start (3.2), got 1.0"


BAD_LINES: list[tuple[str, str, str]] = [
    # (case, line 2 text, expected message fragment); line 1 is always a good call
    ("bad json", '{"v": 1,', "trace line 2: not valid JSON"),
    ("not an object", "[1, 2]", "trace line 2: must be a JSON object, got list"),
    ("missing version", line({k: v for k, v in call_record().items() if k != "v"}), "'v': missing"),
    ("unknown version", line(call_record(v=2)), "'v': unsupported trace version 2 (supported: 1)"),
    ("string version", line(call_record(v="1")), "'v': unsupported trace version '1'"),
    ("unknown kind", line(call_record(kind="tool")), "'kind': must be 'call' or 'request'"),
    ("unknown field", line(call_record(latency=3)), "field 'latency': unknown for a call record"),
    (
        "missing model",
        line({k: v for k, v in call_record(call_id="c2").items() if k != "model"}),
        "field 'model': missing",
    ),
    ("empty workflow", line(call_record(workflow="")), "'workflow': must be a non-empty string"),
    ("start not number", line(call_record(start="1.0")), "'start': must be a number, got '1.0'"),
    ("start is bool", line(call_record(start=True)), "'start': must be a number, got True"),
    ("start is NaN", line(call_record()).replace("1.0", "NaN"), "'start': must be finite"),
    ("end before start", line(call_record(end=0.5)), "'end': must be >= start (1.0), got 0.5"),
    ("float tokens", line(call_record(prompt_tokens=1.5)), "'prompt_tokens': must be an integer"),
    ("negative tokens", line(call_record(completion_tokens=-1)), "must be >= 0, got -1"),
    ("bad status", line(call_record(status="failed")), "'status': must be one of ok, error"),
    ("ttft too long", line(call_record(ttft=2.0)), "'ttft': must lie in [0, end - start]"),
    ("ttft negative", line(call_record(ttft=-0.1)), "'ttft': must lie in [0, end - start]"),
    ("bad replica", line(call_record(replica=3)), "'replica': must be a non-empty string or null"),
    (
        "duplicate call",
        line(call_record()),
        "'call_id': duplicate 'c1' in request rag/r1 (first at",
    ),
    (
        "request end before start",
        line({"v": 1, "kind": "request", "workflow": "w", "request_id": "r", "start": 2, "end": 1}),
        "trace line 2: field 'end': must be >= start (2.0), got 1.0",
    ),
    (
        "request with call field",
        line(
            {"v": 1, "kind": "request", "workflow": "w", "request_id": "r", "start": 0, "end": 1}
            | {"model": "m"}
        ),
        "field 'model': unknown for a request record",
    ),
]


@pytest.mark.parametrize(("case", "bad", "message"), BAD_LINES, ids=[c for c, _, _ in BAD_LINES])
def test_malformed_lines_are_rejected(case: str, bad: str, message: str) -> None:
    with pytest.raises(InvalidInputError) as info:
        parse_trace_lines([line(call_record()), bad])
    assert message in str(info.value), case
    assert "line 2" in str(info.value)


def test_duplicate_request_record() -> None:
    request = TraceRequest("w", "r1", 0.0, 1.0)
    with pytest.raises(InvalidInputError, match=r"line 3: field 'request_id': duplicate request"):
        parse_trace_lines([dumps(request), "", dumps(request)])


def test_same_call_id_in_different_requests_is_fine() -> None:
    trace = parse_trace_lines([line(call_record()), line(call_record(request_id="r2"))])
    assert len(trace.calls) == 2
