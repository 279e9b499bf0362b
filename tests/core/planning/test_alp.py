"""The ALP on hand-made profile curves; every expected number is derived in a comment."""

from __future__ import annotations

import argparse
import itertools
import json
import math
from pathlib import Path

import numpy as np
import pytest

from services.cli import predict as predict_cli
from services.core.allocation import Allocation, check_fraction_unit
from services.core.errors import InfeasibleError, InvalidInputError
from services.core.perf.profile import Profile, ProfileKey, ProfilePoint
from services.core.planning.alp import (
    BurstTable,
    Prediction,
    call_latencies,
    call_latency,
    llm_loads,
    llm_term,
    pooling_factor,
    predict,
    replica_burst,
)
from services.core.workload.demand import LlmDemand, WorkflowDemand
from services.core.workload.stats import workflow_stats
from services.core.workload.trace import Trace, TraceCall


def curve(model: str, points: list[tuple[float, float]], saturation: float) -> Profile:
    key = ProfileKey(model, "H100-SXM", 1, 1.0, "test", "mix")
    pts = tuple(ProfilePoint(r, lat, lat, lat, 0.0, 0.0) for r, lat in points)
    return Profile(key, pts, saturation)


# A: 1 s idle, 2 s at 4 calls/s, saturates at 5 calls/s (per replica)
# B: 0.5 s idle, 1.5 s at 2 calls/s, saturates at 3 calls/s
# C: a flat 1 s up to saturation at 10 calls/s
CURVES = {
    "A": curve("A", [(0.0, 1.0), (4.0, 2.0)], 5.0),
    "B": curve("B", [(0.0, 0.5), (2.0, 1.5)], 3.0),
    "C": curve("C", [(0.0, 1.0), (9.0, 1.0)], 10.0),
}


def lookup(model: str, tp: int, fraction: float) -> Profile:
    return CURVES[model]


ONE = Allocation(fraction=1.0, tp=1, replicas=1)
HALF = Allocation(fraction=0.5, tp=1, replicas=1)


def serial() -> WorkflowDemand:
    return WorkflowDemand("w", (LlmDemand("A", 2, 1), LlmDemand("B", 1, 1)), tool_time=0.5)


def run(
    workflows: list[WorkflowDemand], alloc: dict[str, Allocation], rates: dict[str, float]
) -> Prediction:
    return predict(workflows, lookup, alloc, rates)


def test_serial_workflow() -> None:
    p = run([serial()], {"A": ONE, "B": HALF}, {"w": 1.0})
    # A carries 1 x 2 = 2 calls/s -> 1.5 s per call (halfway up its curve); term 1.5 x 2 / 1 = 3
    # B carries 1 call/s -> 1.0 s; term 1.0. L = 3 + 1 + 0.5 tool = 4.5
    w = p.workflow("w")
    assert w.latency == pytest.approx(4.5)
    # T = min(1 x 5 / 2, 1 x 3 / 1) = 2.5 requests/s
    assert w.throughput == pytest.approx(2.5)
    assert (p.feasible, p.reasons, p.gpus) == (True, (), 1.5)
    a = p.llm("A")
    assert (a.load, a.replica_rate, a.capacity, a.call_latency) == (2.0, 2.0, 5.0, 1.5)
    assert a.utilization == pytest.approx(0.4)


def test_replicas_split_the_load() -> None:
    p = run([serial()], {"A": Allocation(1.0, 1, 2), "B": HALF}, {"w": 1.0})
    # A: 2 calls/s over 2 replicas -> 1 each -> 1.25 s; term 2.5. L = 2.5 + 1 + 0.5
    assert p.workflow("w").latency == pytest.approx(4.0)
    # T = min(2 x 5 / 2, 3 / 1) = 3
    assert p.workflow("w").throughput == pytest.approx(3.0)
    assert p.gpus == 2.5


def test_fan_out_concurrency_divides_the_term() -> None:
    w = WorkflowDemand("w", (LlmDemand("C", 8, 8),))
    p = run([w], {"C": ONE}, {"w": 1.0})
    # 8 calls of 1 s, 8 at a time: one second of busy time; T = 10 / 8
    assert p.workflow("w").latency == pytest.approx(1.0)
    assert p.workflow("w").throughput == pytest.approx(1.25)


def test_parallel_stage_takes_the_max() -> None:
    w = WorkflowDemand(
        "w", (LlmDemand("A", 2, 1), LlmDemand("B", 1, 1)), tool_time=0.5, stages=(("A", "B"),)
    )
    p = run([w], {"A": ONE, "B": HALF}, {"w": 1.0})
    # terms A 3, B 1 run side by side: max 3, plus tool 0.5 (serial would be 4.5)
    assert p.workflow("w").latency == pytest.approx(3.5)


def test_stages_mix_serial_and_parallel() -> None:
    w = WorkflowDemand(
        "w",
        (LlmDemand("A", 2, 1), LlmDemand("B", 1, 1), LlmDemand("C", 1, 1)),
        stages=(("C",), ("A", "B")),
    )
    p = run([w], {"A": ONE, "B": HALF, "C": ONE}, {"w": 1.0})
    # C: 1 s; then max(A 3, B 1) = 3 -> 4
    assert p.workflow("w").latency == pytest.approx(4.0)


def test_shared_llm_adds_loads() -> None:
    w1 = WorkflowDemand("w1", (LlmDemand("A", 2, 1),))
    w2 = WorkflowDemand("w2", (LlmDemand("A", 1, 1), LlmDemand("C", 1, 1)))
    rates = {"w1": 1.0, "w2": 2.0}
    # load on A = 1 x 2 + 2 x 1 = 4 calls/s -> 2 s per call; C carries 2 calls/s -> 1 s
    assert llm_loads([w1, w2], rates) == {"A": 4.0, "C": 2.0}
    p = run([w1, w2], {"A": ONE, "C": ONE}, rates)
    # w1: 2 x 2 = 4; w2: 2 x 1 + 1 x 1 = 3
    assert p.workflow("w1").latency == pytest.approx(4.0)
    assert p.workflow("w2").latency == pytest.approx(3.0)
    # common scale s = min(5 / 4, 10 / 2) = 1.25: T_w1 = 1.25, T_w2 = 2.5
    assert p.workflow("w1").throughput == pytest.approx(1.25)
    assert p.workflow("w2").throughput == pytest.approx(2.5)
    # alone, w1 would see A at 2 calls/s: 1.5 s per call -> 3 s
    alone = run([w1], {"A": ONE}, {"w1": 1.0})
    assert alone.workflow("w1").latency == pytest.approx(3.0)


def test_separable_terms_match_predict() -> None:
    # one LLM's term depends only on its profile, replicas and load
    demand = LlmDemand("A", 2, 1)
    assert call_latency(CURVES["A"], 2, 2.0) == pytest.approx(1.25)
    assert llm_term(CURVES["A"], 2, 2.0, demand) == pytest.approx(2.5)


def test_saturated_llm_is_infeasible() -> None:
    p = run([serial()], {"A": ONE, "B": HALF}, {"w": 2.5})
    # A carries 2.5 x 2 = 5 calls/s = its capacity 5: unbounded latency
    assert not p.feasible
    assert p.reasons == (
        "A: 5 calls/s on 1 replica(s) of capacity 5 calls/s each: saturated (utilisation 1)",
    )
    assert math.isinf(p.workflow("w").latency)
    assert p.workflow("w").throughput == pytest.approx(2.5)


def test_utilisation_cap() -> None:
    # A at 2.3 x 2 = 4.6 calls/s: utilisation 0.92 > rho 0.9; B at 2.3 of 3: 0.77
    p = predict([serial()], lookup, {"A": ONE, "B": HALF}, {"w": 2.3}, rho=0.9)
    assert not p.feasible
    (reason,) = p.reasons
    assert reason.startswith("A: 4.6 calls/s") and "utilisation 0.92 exceeds rho 0.9" in reason
    assert math.isfinite(p.workflow("w").latency)
    assert predict([serial()], lookup, {"A": ONE, "B": HALF}, {"w": 2.3}).feasible


def test_memory_infeasibility_from_fit_check_and_lookup() -> None:
    def fits(model: str, tp: int, fraction: float) -> str | None:
        return "weights 16 GiB exceed 10 GiB" if model == "A" and fraction < 1 else None

    def strict_lookup(model: str, tp: int, fraction: float) -> Profile:
        if model == "B" and fraction < 1:
            raise InfeasibleError("KV cache below the minimum")
        return CURVES[model]

    alloc = {"A": Allocation(0.25, 1, 1), "B": HALF}
    p = predict([serial()], strict_lookup, alloc, {"w": 1.0}, fits=fits)
    assert not p.feasible
    assert p.reasons == (
        "A: does not fit (tp 1, fraction 0.25): weights 16 GiB exceed 10 GiB",
        "B: does not fit (tp 1, fraction 0.5): KV cache below the minimum",
    )
    assert math.isinf(p.workflow("w").latency)
    assert p.workflow("w").throughput == 0.0
    assert p.llm("A").capacity == 0.0


def test_gpu_budget() -> None:
    p = predict(
        [serial()], lookup, {"A": Allocation(1.0, 2, 1), "B": ONE}, {"w": 1.0}, gpus_available=2
    )
    assert p.reasons == ("allocation uses 3 GPUs, 2 available",)


@pytest.mark.parametrize(
    ("fraction", "tp", "replicas", "message"),
    [
        (1.0, 3, 1, "tp: must be one of (1, 2, 4, 8), got 3"),
        (1.0, 1, 0, "replicas: must be >= 1, got 0"),
        (1.0, 1, 2**31, "replicas: must be at most 131072, got 2147483648"),
        (0.0, 1, 1, "fraction: must be in (0, 1], got 0.0"),
        (1.5, 1, 1, "fraction: must be in (0, 1], got 1.5"),
        (0.5, 2, 1, "fraction: a fraction below 1 (0.5) needs tp 1, got tp 2"),
    ],
)
def test_allocation_rules(fraction: float, tp: int, replicas: int, message: str) -> None:
    with pytest.raises(InvalidInputError, match=message.replace("(", r"\(").replace(")", r"\)")):
        Allocation(fraction, tp, replicas)


def test_fraction_unit() -> None:
    check_fraction_unit("A", Allocation(0.75, 1, 1), 4)
    with pytest.raises(InvalidInputError, match=r"A\.fraction: must be a multiple of 1/4, got 0.3"):
        check_fraction_unit("A", Allocation(0.3, 1, 1), 4)


def test_caller_errors() -> None:
    with pytest.raises(InvalidInputError, match="no entry for LLM 'B'"):
        run([serial()], {"A": ONE}, {"w": 1.0})
    with pytest.raises(InvalidInputError, match="no rate for workflow 'w'"):
        run([serial()], {"A": ONE, "B": ONE}, {})
    with pytest.raises(InvalidInputError, match="stages: must partition"):
        WorkflowDemand("w", (LlmDemand("A", 1, 1),), stages=(("A", "B"),))
    with pytest.raises(InvalidInputError, match=r"A\.p: must be >= 1"):
        WorkflowDemand("w", (LlmDemand("A", 1, 0.5),))


def test_demand_from_trace_stats() -> None:
    # r1: A [0,2] and B [1,3] overlap, then tool time until the request's last call C [4,5]
    calls = (
        TraceCall("w", "r1", "1", "A", 0, 2, 1, 1),
        TraceCall("w", "r1", "2", "B", 1, 3, 1, 1),
        TraceCall("w", "r1", "3", "C", 4, 5, 1, 1),
        TraceCall("w", "r1", "4", "D", 5, 6, 1, 1, status="error"),
    )
    (stats,) = workflow_stats(Trace(calls))
    demand = WorkflowDemand.from_stats(stats)
    # D never succeeded: left out; A and B share a stage; tool time 1 (the gap [3, 4])
    assert [d.model for d in demand.llms] == ["A", "B", "C"]
    assert demand.stages == (("A", "B"), ("C",))
    assert demand.tool_time == pytest.approx(1.0)


# --- the CLI: analytic profiles behind the same predict -----------------------------------------

SPEC_YAML = """
version: 1
cluster: {gpu_type: H100-SXM, gpus: 4}
models:
  chat: Qwen/Qwen2.5-0.5B
  big: meta-llama/Llama-3.1-70B
workflows:
  - name: agent
    rate: 2
    stats:
      tool_time: 0.25
      llms:
        chat: {n: 3, prompt_tokens: 300, completion_tokens: 20}
"""


def run_predict_cli(tmp_path: Path, lines: list[str], *extra: str) -> int:
    (tmp_path / "spec.yaml").write_text(SPEC_YAML)
    (tmp_path / "alloc.jsonl").write_text("\n".join(lines) + "\n")
    parser = argparse.ArgumentParser(prog="scepsy")
    predict_cli.register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(
        [
            "predict",
            "--spec",
            str(tmp_path / "spec.yaml"),
            "--allocations",
            str(tmp_path / "alloc.jsonl"),
            *extra,
        ]
    )
    code: int = args.func(args)
    return code


def test_cli_predicts_each_allocation(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    lines = [
        '{"chat": {"fraction": 0.25}, "big": {"tp": 2}}',
        # 70B weights (~131 GiB) cannot fit a quarter of an 80 GiB GPU
        '{"chat": {"fraction": 1}, "big": {"fraction": 0.25, "replicas": 2}}',
        # 3 + 2 GPUs exceed the cluster's 4
        '{"chat": {"replicas": 3}, "big": {"tp": 2}}',
    ]
    assert run_predict_cli(tmp_path, lines, "--json") == 0
    first, second, third = json.loads(capsys.readouterr().out)["predictions"]
    assert (first["feasible"], first["reason"], first["gpus"]) == (True, "", 2.25)
    (agent,) = first["workflows"]
    chat = next(m for m in first["llms"] if m["model"] == "chat")
    # chat carries 2 x 3 = 6 calls/s; latency = 3 calls x per-call latency + 0.25 s tool time;
    # throughput = capacity / n
    assert chat["load"] == 6.0
    assert agent["latency"] == pytest.approx(3 * chat["call_latency"] + 0.25)
    assert agent["throughput"] == pytest.approx(chat["capacity"] / 3)
    assert first["allocation"]["chat"] == {"fraction": 0.25, "tp": 1, "replicas": 1}
    assert second["feasible"] is False
    assert second["reason"].startswith("big: does not fit (tp 1, fraction 0.25): model ")
    assert third["reason"] == "allocation uses 5 GPUs, 4 available"
    # more replicas, less load each: lower latency
    assert third["workflows"][0]["latency"] < agent["latency"]


def test_cli_table(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert run_predict_cli(tmp_path, ['{"chat": {"fraction": 0.5}, "big": {"tp": 4}}']) == 0
    out = capsys.readouterr().out
    assert out.startswith("allocation 1: 4.5 of 4 GPUs, infeasible: allocation uses 4.5 GPUs")
    assert "workflow agent" in out


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("{oops", "line 1: not valid JSON"),
        ('{"gpt": {"tp": 1}}', "line 1: gpt: not a model of the spec"),
        ('{"chat": {"tp": 3}}', "line 1: chat.tp: must be one of (1, 2, 4, 8), got 3"),
        (
            '{"chat": {"fraction": 0.3}}',
            "line 1: chat.fraction: must be a multiple of 1/4, got 0.3",
        ),
        ('{"chat": {"gpus": 1}}', "line 1: chat.gpus: unknown field"),
        ('{"big": {"tp": 2}}', "line 1: allocation: no entry for LLM 'chat' (agent)"),
    ],
)
def test_cli_bad_allocations(tmp_path: Path, line: str, message: str) -> None:
    with pytest.raises(InvalidInputError) as info:
        run_predict_cli(tmp_path, [line])
    assert message in str(info.value)
    assert "alloc.jsonl" in str(info.value)


# ------------------------------------------------------------------------------ fan-outs, pooling
def test_burst_table_interpolates_and_extrapolates() -> None:
    table = BurstTable.of([(4, 1.6), (1, 1.0), (2, 1.2)])
    assert table.extra(1) == 0.0 and table.extra(0.5) == 0.0
    assert table.extra(3) == pytest.approx(0.4)
    assert table.extra(6) == pytest.approx(1.0)  # the last step's slope: 0.2 per call
    with pytest.raises(InvalidInputError):
        BurstTable((2.0,), (1.0,))


def test_replica_burst_spreads_a_fan_out_evenly() -> None:
    assert replica_burst(8, 2) == 4 and replica_burst(3, 6) == 1.0 and replica_burst(1, 1) == 1.0


def test_pooling_factor_is_erlang_c_over_utilisation() -> None:
    assert pooling_factor(1, 0.7) == 1.0
    # M/M/2: C(2, 2u) = 2u^2 / (1 + u), so the factor is u / (1 + u)
    assert pooling_factor(2, 0.6) == pytest.approx(0.6 / 1.6)
    factors = [pooling_factor(c, 0.8) for c in (1, 2, 4, 8, 16)]
    assert all(b < a for a, b in itertools.pairwise(factors))


def test_pooled_routing_shrinks_only_the_wait() -> None:
    # TTFT grows by 0.5 s of the 1.0 s latency growth: only that half pools
    base = CURVES["A"]
    points = tuple(
        ProfilePoint(p.rate, p.mean_latency, p.p50_latency, p.p99_latency, 0.5 * p.mean_latency, 0)
        for p in base.points
    )
    profile = Profile(base.key, points, base.saturation_rate)
    plain = call_latency(profile, 4, 4 * 1.6)
    pooled = call_latency(profile, 4, 4 * 1.6, pooled=True)
    idle = points[0].mean_latency
    wait = profile.ttft_at(1.6) - points[0].ttft
    assert idle < pooled < plain
    # 1.6 calls/s per replica of a 5 calls/s saturation
    assert plain - pooled == pytest.approx(wait * (1 - pooling_factor(4, 1.6 / 5.0)))
    assert call_latency(profile, 1, 1.6, pooled=True) == pytest.approx(
        call_latency(profile, 1, 1.6)
    )


def test_a_fan_out_profile_is_not_charged_its_own_bursts_twice() -> None:
    # A at 2 calls/s per replica: 1.5 s, of which 0.5 s is waiting (idle 1.0 s)
    single = CURVES["A"]
    grouped = Profile(single.key, single.points, single.saturation_rate, group=4.0)
    table = BurstTable.of([(1, 1.0), (4, 1.6), (8, 2.0)])
    # p = 8 over 2 replicas: bursts of 4 per replica, the group the profile was measured with
    assert call_latency(grouped, 2, 4.0, table, 8) == pytest.approx(1.5)
    # a single-call profile gets the batch-arrival wait (1 + 4) / 2 and 0.6 s of shared iterations
    assert call_latency(single, 2, 4.0, table, 8) == pytest.approx(1.0 + 0.5 * 2.5 + 0.6)
    # p = 8 on one replica: only the growth from 4 to 8 is added (wait x 9/5, extra 2.0 - 1.6)
    assert call_latency(grouped, 1, 2.0, table, 8) == pytest.approx(1.0 + 0.5 * 9 / 5 + 0.4)
    # the search's vectorised form agrees on both
    many = call_latencies(grouped, np.array([1.0, 2.0]), 2.0, table, 8)
    assert many[0] == pytest.approx(call_latency(grouped, 1, 2.0, table, 8))
    assert many[1] == pytest.approx(call_latency(grouped, 2, 2.0, table, 8))
    with pytest.raises(InvalidInputError, match="group"):
        Profile(single.key, single.points, single.saturation_rate, group=0.5)
    assert Profile.from_dict(grouped.to_dict()) == grouped
