"""Workflow statistics on hand-built traces; every expectation is derived in a comment."""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

import pytest

from services.cli import trace as trace_cli
from services.core.errors import InvalidInputError
from services.core.workload.stats import (
    TokenStats,
    WorkflowStats,
    intersection,
    merge_intervals,
    token_stats,
    workflow_stats,
)
from services.core.workload.trace import Trace, TraceCall, TraceRequest, write_trace


class Builder:
    """Builds calls with unique ids; tokens and status default to something harmless."""

    def __init__(self, workflow: str = "w") -> None:
        self.workflow = workflow
        self.calls: list[TraceCall] = []

    def add(
        self,
        request: str,
        model: str,
        start: float,
        end: float,
        *,
        prompt: int = 10,
        completion: int = 5,
        status: str = "ok",
        ttft: float | None = None,
    ) -> Builder:
        assert status in ("ok", "error", "cancelled")
        self.calls.append(
            TraceCall(
                self.workflow,
                request,
                f"c{len(self.calls)}",
                model,
                start,
                end,
                prompt,
                completion,
                ttft=ttft,
                status=status,  # type: ignore[arg-type]
            )
        )
        return self

    def stats(self, *requests: TraceRequest, **kwargs: float) -> WorkflowStats:
        result = workflow_stats(Trace(tuple(self.calls), requests), **kwargs)  # type: ignore[arg-type]
        assert len(result) == 1
        return result[0]


@pytest.mark.parametrize(
    ("intervals", "merged"),
    [
        ([], []),
        ([(0, 1)], [(0, 1)]),
        ([(2, 3), (0, 1)], [(0, 1), (2, 3)]),
        ([(0, 2), (1, 3)], [(0, 3)]),
        ([(0, 1), (1, 2)], [(0, 2)]),  # touching intervals merge
        ([(0, 5), (1, 2), (3, 4)], [(0, 5)]),  # nested
    ],
)
def test_merge_intervals(
    intervals: list[tuple[float, float]], merged: list[tuple[float, float]]
) -> None:
    assert merge_intervals(intervals) == merged


@pytest.mark.parametrize(
    ("a", "b", "length"),
    [
        ([(0, 4)], [(1, 3)], 2),
        ([(0, 1)], [(1, 2)], 0),  # touching is not overlapping
        ([(0, 2), (3, 5)], [(1, 4)], 2),  # [1,2] + [3,4]
        ([], [(0, 1)], 0),
    ],
)
def test_intersection(
    a: list[tuple[float, float]], b: list[tuple[float, float]], length: float
) -> None:
    assert intersection(a, b) == length


def test_sequential_calls() -> None:
    # r1: A [0,1], B [1,3], A [3,4]   r2: A [0,2], B [2,3]
    s = (
        Builder()
        .add("r1", "A", 0, 1)
        .add("r1", "B", 1, 3)
        .add("r1", "A", 3, 4)
        .add("r2", "A", 0, 2)
        .add("r2", "B", 2, 3)
        .stats()
    )
    a, b = s.llm("A"), s.llm("B")
    # n_A = (2 + 1) / 2 requests; n_B = 2 / 2
    assert (a.n, b.n) == (1.5, 1.0)
    # no call of the same LLM overlaps another: p = 1
    assert (a.p, b.p) == (1.0, 1.0)
    # busy_A = 2 in both; busy_B = 2, 1
    assert a.busy_mean == 2.0
    assert b.busy_mean == 1.5
    # share_A: r1 2/4 = 1/2, r2 2/3; mean 7/12, population std 1/12, CV 1/7
    assert a.share_mean == pytest.approx(7 / 12)
    assert a.share_cv == pytest.approx(1 / 7)
    # e2e: 4 and 3 -> mean 3.5, std 0.5, CV 1/7; the LLMs cover everything: no tool time
    assert s.e2e_mean == 3.5
    assert s.e2e_cv == pytest.approx(1 / 7)
    assert (s.tool_time_mean, s.tool_share) == (0.0, 0.0)
    # A and B only touch: no overlap; A starts first (offset 0), B at mean offset 1.5
    (pair,) = s.overlaps
    assert (pair.models, pair.co_requests, pair.overlap_fraction) == (("A", "B"), 2, 0.0)
    assert s.stages == (("A",), ("B",))
    # mean call latency of A: (1 + 1 + 2) / 3
    assert a.latency_mean == pytest.approx(4 / 3)


def test_fan_out_of_eight_parallel_calls() -> None:
    # planner P [0,1], 8 workers W all in [1,3], planner P again [3,4]
    b = Builder().add("r1", "P", 0, 1)
    for _ in range(8):
        b.add("r1", "W", 1, 3)
    s = b.add("r1", "P", 3, 4).stats()
    w = s.llm("W")
    # sum of durations 8 x 2 = 16 over a busy time of 2: p = 8
    assert (w.n, w.p, w.busy_mean) == (8.0, 8.0, 2.0)
    assert (s.llm("P").n, s.llm("P").p) == (2.0, 1.0)
    # shares: W 2/4, P 2/4
    assert w.share_mean == 0.5
    assert s.stages == (("P",), ("W",))


def test_staggered_parallel_calls_time_weighted() -> None:
    # W [0,2] and W [1,3]: durations 4 over union [0,3] = 3 -> p = 4/3
    s = Builder().add("r1", "W", 0, 2).add("r1", "W", 1, 3).stats()
    assert s.llm("W").p == pytest.approx(4 / 3)


def test_loops_mean_calls_per_request() -> None:
    # requests loop 1, 2 and 3 times over model L (one second each, back to back)
    b = Builder()
    for rid, loops in (("r1", 1), ("r2", 2), ("r3", 3)):
        for i in range(loops):
            b.add(rid, "L", i, i + 1)
    s = b.stats()
    # n = 6 calls / 3 requests; e2e 1, 2, 3 -> mean 2, CV sqrt(2/3)/2
    assert s.llm("L").n == 2.0
    assert s.e2e_mean == 2.0
    assert s.e2e_cv == pytest.approx((2 / 3) ** 0.5 / 2)
    # the only LLM always has share 1: perfectly stable
    assert (s.llm("L").share_mean, s.llm("L").share_cv) == (1.0, 0.0)


def test_two_llms_overlapping_form_a_stage() -> None:
    b = (
        Builder()
        .add("r1", "A", 0, 4)
        .add("r1", "B", 1, 3)  # overlap 2, smaller busy 2 -> 1.0
        .add("r1", "C", 5, 6)
        .add("r2", "A", 0, 2)
        .add("r2", "B", 2, 4)  # touching -> 0
        .add("r3", "A", 0, 2)
        .add("r3", "B", 1, 5)  # overlap 1, smaller busy 2 -> 0.5
    )
    s = b.stats()
    ab = next(p for p in s.overlaps if p.models == ("A", "B"))
    # overlapping in 2 of 3 co-occurring requests; mean ratio (1 + 0 + 0.5) / 3
    assert ab.co_requests == 3
    assert ab.overlap_fraction == pytest.approx(2 / 3)
    assert ab.mean_overlap == pytest.approx(0.5)
    ac = next(p for p in s.overlaps if p.models == ("A", "C"))
    assert (ac.co_requests, ac.overlap_fraction) == (1, 0.0)
    # 2/3 >= 0.5: A and B share a stage; C comes later (offset 5)
    assert s.stages == (("A", "B"), ("C",))
    # a stricter threshold splits them; B's mean first offset (1 + 2 + 1) / 3 > A's 0
    assert b.stats(overlap_threshold=0.7).stages == (("A",), ("B",), ("C",))
    # C is called in 1 of 3 requests
    assert s.llm("C").n == pytest.approx(1 / 3)


def test_tool_time_with_and_without_request_records() -> None:
    b = (
        Builder()
        .add("r1", "A", 0, 1)
        .add("r1", "B", 3, 4)
        .add("r2", "A", 0, 1)
        .add("r2", "A", 2, 3)
    )
    # r1 has a record [-1, 5]: e2e 6, LLM union 2 -> tool 4
    # r2 has none: span [0, 3], LLM union 2 -> tool 1 (the gap between its calls)
    s = b.stats(TraceRequest("w", "r1", -1.0, 5.0))
    assert s.request_records == 1
    assert s.e2e_mean == 4.5
    assert s.tool_time_mean == 2.5
    # 5 s of tool time in 9 s of end-to-end time
    assert s.tool_share == pytest.approx(5 / 9)


def test_request_record_hull_with_router_clock() -> None:
    # the client's record ends at 1.9 but the router saw the call end at 2.0: take the hull
    s = Builder().add("r1", "A", 0.5, 2.0).stats(TraceRequest("w", "r1", 0.0, 1.9))
    assert s.e2e_mean == 2.0
    assert s.tool_time_mean == pytest.approx(0.5)


def test_errors_are_counted_not_timed() -> None:
    b = (
        Builder()
        .add("r1", "A", 0, 1)
        .add("r1", "A", 1, 9, status="error")  # ignored for timing
        .add("r2", "A", 0, 2)
        .add("r2", "A", 2, 3, status="cancelled")
        .add("r3", "A", 0, 5, status="error")  # no ok call, no record: failed request
        .add("r4", "A", 0, 1)  # its request record says error: failed request
    )
    s = b.stats(TraceRequest("w", "r4", 0.0, 1.0, status="error"))
    a = s.llm("A")
    assert (s.requests, s.failed_requests) == (2, 2)
    assert (a.calls, a.errors, a.cancelled) == (2, 2, 1)
    # timing from r1 [0,1] and r2 [0,2] only
    assert a.n == 1.0
    assert a.latency_mean == 1.5
    assert s.e2e_mean == 1.5


def test_token_distribution_and_ttft() -> None:
    b = Builder()
    for i, prompt in enumerate((10, 20, 30, 40, 50)):
        b.add(f"r{i}", "A", 0, 1, prompt=prompt, completion=2 * prompt, ttft=0.1 * (i + 1))
    b.add("r0", "B", 1, 2)
    s = b.stats()
    # linear percentiles over 5 values: p90 at index 3.6 -> 40 + 0.6 x 10; p99 at 3.96
    assert s.llm("A").prompt == pytest.approx(TokenStats(30, 30, 46, 49.6, 50))
    assert s.llm("A").completion.mean == 60
    assert s.llm("A").ttft_mean == pytest.approx(0.3)
    assert s.llm("B").ttft_mean is None
    assert token_stats([]) == TokenStats(0, 0, 0, 0, 0)


def test_sample_is_bounded_and_deterministic() -> None:
    calls = [
        TraceCall("w", f"r{i}", "c", "A", float(i), i + 0.5, prompt_tokens=i, completion_tokens=1)
        for i in range(10)
    ]
    shuffled = calls[:]
    random.Random(7).shuffle(shuffled)
    first = workflow_stats(Trace(tuple(calls)), sample_size=4)[0].llm("A").sample
    second = workflow_stats(Trace(tuple(shuffled)), sample_size=4)[0].llm("A").sample
    # evenly spaced in time order: indices 0, 10//4 = 2, 20//4 = 5, 30//4 = 7
    assert first == second == ((0, 1), (2, 1), (5, 1), (7, 1))
    assert len(workflow_stats(Trace(tuple(calls)))[0].llm("A").sample) == 10


def test_untagged_single_call_requests_and_several_workflows() -> None:
    calls = (
        TraceCall("untagged", "x1", "x1", "A", 0, 2, 1, 1),
        TraceCall("untagged", "x2", "x2", "A", 5, 6, 1, 1),
        TraceCall("agent", "r1", "c1", "B", 0, 1, 1, 1),
    )
    agent, untagged = workflow_stats(Trace(calls))
    assert (agent.workflow, untagged.workflow) == ("agent", "untagged")
    assert (untagged.requests, untagged.llm("A").n, untagged.llm("A").p) == (2, 1.0, 1.0)
    assert untagged.e2e_mean == 1.5
    with pytest.raises(KeyError):
        untagged.llm("B")


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [({"overlap_threshold": 0.0}, "overlap_threshold"), ({"sample_size": 0}, "sample_size")],
)
def test_bad_parameters(kwargs: dict[str, float], field: str) -> None:
    with pytest.raises(InvalidInputError, match=field):
        workflow_stats(Trace(()), **kwargs)  # type: ignore[arg-type]


# --- the CLI ---------------------------------------------------------------------------------


def run_cli(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="scepsy")
    trace_cli.register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    code: int = args.func(args)
    return code


@pytest.fixture
def trace_file(tmp_path: Path) -> Path:
    path = tmp_path / "trace.jsonl"
    b = Builder("rag").add("r1", "llama-8b", 0, 1).add("r1", "reranker", 1, 2)
    b.add("r2", "llama-8b", 0, 2)
    write_trace(path, b.calls, [TraceRequest("rag", "r2", 0.0, 3.0)])
    return path


def test_cli_table(trace_file: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert run_cli(["trace", "stats", str(trace_file)]) == 0
    out = capsys.readouterr().out
    assert "workflow rag: 2 requests (0 failed)" in out
    # tool time: r1 0, r2 1 -> 0.5 s/request, 1 s of 5 s end-to-end = 20%
    assert "tool time 0.500 s/request (20.0%)" in out
    assert "stages: [llama-8b] -> [reranker]" in out
    assert any(row.startswith("llama-8b") and " 2 " in row for row in out.splitlines())


def test_cli_json(trace_file: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert run_cli(["trace", "stats", str(trace_file), "--json", "--sample-size", "1"]) == 0
    doc = json.loads(capsys.readouterr().out)
    (wf,) = doc["workflows"]
    llms = {m["model"]: m for m in wf["llms"]}
    # reranker is called in 1 of 2 requests
    assert llms["reranker"]["n"] == 0.5
    assert llms["llama-8b"]["sample"] == [[10, 5]]
    assert wf["stages"] == [["llama-8b"], ["reranker"]]


def test_cli_bad_file(tmp_path: Path) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text('{"v": 1}\n{oops\n')
    with pytest.raises(InvalidInputError, match=r"bad\.jsonl line 1: field 'workflow': missing"):
        run_cli(["trace", "stats", str(path)])
