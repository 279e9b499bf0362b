"""The joint sweep's pure parts: fan-outs read from a trace, and the groups a step sends."""

from __future__ import annotations

from collections import Counter
from dataclasses import replace

import numpy as np
import pytest

from services.core.errors import InvalidInputError
from services.core.perf.analytic import RequestMix
from services.core.perf.profile import ProfileKey
from services.core.sim.replay import ReplayRequest
from services.core.workload.trace import Status, TraceCall
from services.profiler.joint import JointLlm, JointMeasurement, JointSweep, fan_outs
from services.profiler.vllm_backend import RatePoint, SweepConfig

MIX = RequestMix.fixed(40, 1)


def call(request: str, model: str, start: float, end: float, status: Status = "ok") -> TraceCall:
    return TraceCall(
        "rag", request, f"{request}-{model}-{start}", model, start, end, 40, 1, None, status
    )


def test_fan_outs_are_overlapping_calls_of_one_model_in_one_request() -> None:
    calls = [
        # r1: the reranker scores 3 passages at once, then 2 more after the first three ended
        call("r1", "reranker", 0.00, 0.30),
        call("r1", "reranker", 0.01, 0.10),
        call("r1", "reranker", 0.02, 0.20),
        call("r1", "reranker", 0.30, 0.40),
        call("r1", "reranker", 0.31, 0.35),
        call("r1", "generator", 0.40, 0.90),
        # r2: a chain of overlaps is one fan-out (a overlaps b, b overlaps c, a ends before c)
        call("r2", "reranker", 1.0, 1.2),
        call("r2", "reranker", 1.1, 1.4),
        call("r2", "reranker", 1.3, 1.5),
        call("r2", "generator", 1.5, 2.0),
    ]
    got = fan_outs(calls)
    assert got == {"generator": (1, 1), "reranker": (3, 2, 3)}
    # the trace's order does not matter
    assert fan_outs(reversed(calls)) == got


def test_fan_outs_count_ok_calls_only() -> None:
    calls = [
        call("r1", "reranker", 0.0, 0.3),
        call("r1", "reranker", 0.0, 0.2, "error"),
        call("r1", "reranker", 0.0, 0.3, "cancelled"),
        call("r2", "generator", 0.0, 0.3, "error"),
    ]
    assert fan_outs(calls) == {"reranker": (1,)}


def test_a_llm_without_sizes_sends_fixed_groups() -> None:
    fixed = JointLlm("reranker", MIX, calls=6.0, group=6)
    assert fixed.mean_group == 6.0
    rng = np.random.default_rng(0)
    assert {fixed.draw_group(rng) for _ in range(20)} == {6}
    with pytest.raises(InvalidInputError, match="sizes"):
        JointLlm("reranker", MIX, calls=6.0, sizes=(4, 0))


def test_a_step_draws_each_groups_size_from_the_fan_outs() -> None:
    rerank = JointLlm("reranker", MIX, calls=6.5, group=6, sizes=(4, 5, 8, 8, 7))
    generate = JointLlm("generator", MIX, calls=1.0, sizes=(1, 1))
    sweep = JointSweep("http://unused", [rerank, generate], seed=3)
    lam, span = 2.0, 2000.0
    plan = sweep.plan(lam, span)
    offsets = [offset for offset, _, _ in plan]
    assert offsets == sorted(offsets) and offsets[0] >= 0 and offsets[-1] < span
    sizes = Counter(size for _, d, size in plan if d is rerank)
    assert set(sizes) == {4, 5, 7, 8}
    # each fan-out seen equally likely: 8 (twice in the sizes) about twice as often as 4
    assert sizes[8] / sizes[4] == pytest.approx(2.0, rel=0.2)
    # calls arrive at the LLM's share of the workflow rate whatever the group sizes:
    # groups at lam x n / mean size, mean size 6.4 calls
    calls = sum(size for _, d, size in plan if d is rerank)
    assert calls / span == pytest.approx(lam * 6.5, rel=0.05)
    assert sum(size for _, d, size in plan if d is generate) / span == pytest.approx(lam, rel=0.1)
    assert {size for _, d, size in plan if d is generate} == {1}


def point(rate: float, latency: float) -> RatePoint:
    return RatePoint(
        rate=rate,
        calls=10,
        ok=10,
        errors=0,
        error_kinds={},
        throughput=rate,
        mean_latency=latency,
        p50_latency=latency,
        p99_latency=latency,
        ttft=latency / 2,
        tpot=0.0,
        saturated=False,
    )


def test_a_profile_of_drawn_groups_names_their_mean_size() -> None:
    rerank = JointLlm("reranker", MIX, calls=6.5, group=6, replicas=2, sizes=(4, 8, 9))
    measurement = JointMeasurement(
        (rerank,),
        (1.0, 2.0),
        {"reranker": (point(6.5, 0.1), point(13.0, 0.2))},
        {"reranker": 0.05},
        "rates",
        {},
    )
    key = ProfileKey("tiny-llama", "cpu", 1, 1.0, "vllm-joint", MIX.id)
    # the ALP adds burst costs only beyond the groups the profile measured: 7 calls / 2 replicas
    assert measurement.profile("reranker", key).group == pytest.approx(3.5)
    assert measurement.to_dict()["llms"][0]["sizes"] == {4: 1, 8: 1, 9: 1}


def test_the_binding_llm_is_the_one_that_allows_the_least_workflow_rate() -> None:
    # both LLMs fell behind at the last step (the generator not yet confirmed): each one's
    # saturation is its best throughput, and the workflow's capacity is the lesser of the two
    rerank = JointLlm("reranker", MIX, calls=4, group=4, replicas=1, sizes=(4,))
    generate = JointLlm("generator", MIX, calls=1, group=1, replicas=1, sizes=(1,))

    def behind(rate: float, done: float) -> RatePoint:
        return replace(point(rate, 0.5), throughput=done, saturated=True)

    measurement = JointMeasurement(
        (rerank, generate),
        (2.0, 3.0, 3.0),
        {
            "reranker": (point(8.0, 0.1), behind(12.0, 11.0), behind(12.0, 11.2)),
            "generator": (point(2.0, 0.2), point(3.0, 0.3), behind(3.0, 2.5)),
        },
        {"reranker": 0.05, "generator": 0.1},
        "saturated",
        {},
    )
    # reranker: 11.2 calls/s / 4 calls = 2.8 requests/s; generator: 3.0 calls/s (its best)
    assert measurement.saturation_rate("reranker") == pytest.approx(11.2)
    assert measurement.saturation_rate("generator") == pytest.approx(3.0)
    assert measurement.binding == "reranker"
    assert measurement.capacity() == pytest.approx(2.8)
    # the generator kept up at the last step: its saturation is a lower bound past its last rate
    kept = measurement.points["generator"][:2]
    kept_up = replace(measurement, points={**measurement.points, "generator": kept})
    assert kept_up.saturation_rate("generator") == pytest.approx(1.1 * 3.0)
    # the generator behind at both of its last steps, below the reranker's rate: it binds
    tighter = (point(2.0, 0.2), behind(3.0, 2.5), behind(3.0, 2.6))
    slower = replace(measurement, points={**measurement.points, "generator": tighter})
    assert slower.binding == "generator" and slower.capacity() == pytest.approx(2.6)
    # no saturation, no binding LLM
    assert replace(measurement, stop_reason="budget").binding == ""


def test_operating_steps_refine_the_curve_but_not_the_saturation() -> None:
    generate = JointLlm("generator", MIX, calls=1, group=1, replicas=1)
    measurement = JointMeasurement(
        (generate,),
        (1.0, 3.0, 4.0),
        {"generator": (point(1.0, 0.1), point(3.0, 0.3), replace(point(4.0, 0.4), saturated=True))},
        {"generator": 0.05},
        "budget",
        {},
    )
    key = ProfileKey("tiny-llama", "cpu", 1, 1.0, "vllm-joint", MIX.id)
    before = measurement.profile("generator", key)
    # an operating step at 2 calls/s between the sweep's points; one past saturation is dropped
    grown = measurement.with_operating({"generator": point(2.0, 0.5)})
    grown = grown.with_operating({"generator": point(4.5, 0.2)})
    assert grown.saturation_rate("generator") == measurement.saturation_rate("generator")
    after = grown.profile("generator", key)
    assert [p.rate for p in before.points] == [1.0, 3.0]
    assert [p.rate for p in after.points] == [1.0, 2.0, 3.0]
    # 0.5 at 2/s then 0.3 at 3/s: pooled, the curve stays non-decreasing
    assert [p.mean_latency for p in after.points] == pytest.approx([0.1, 0.4, 0.4])
    assert grown.profile("generator", key, operating=False) == before
    assert [p["rate"] for p in grown.to_dict()["operating"]["generator"]] == [2.0, 4.5]
    with pytest.raises(InvalidInputError, match="one point per LLM"):
        measurement.with_operating({"reranker": point(2.0, 0.5)})


def test_steps_at_one_rate_are_one_point_of_their_calls_weighted_mean() -> None:
    generate = JointLlm("generator", MIX, calls=1, group=1, replicas=1)
    measurement = JointMeasurement(
        (generate,),
        (1.0, 3.0),
        {"generator": (point(1.0, 0.1), point(3.0, 0.3))},
        {"generator": 0.05},
        "rates",
        {},
    )
    # an operating step repeated at 2/s (10 and 30 calls), one at the sweep's 3/s
    twice = measurement.with_operating({"generator": point(2.0, 0.2)})
    twice = twice.with_operating({"generator": replace(point(2.0, 0.4), ok=30)})
    twice = twice.with_operating({"generator": point(3.0, 0.5)})
    key = ProfileKey("tiny-llama", "cpu", 1, 1.0, "vllm-joint", MIX.id)
    profile = twice.profile("generator", key)
    assert [p.rate for p in profile.points] == [1.0, 2.0, 3.0]
    # (0.2 x 10 + 0.4 x 30) / 40 = 0.35; (0.3 + 0.5) / 2 = 0.4
    assert [p.mean_latency for p in profile.points] == pytest.approx([0.1, 0.35, 0.4])
    assert profile.points[1].ttft == pytest.approx(0.175)


def test_an_ordered_step_holds_a_few_requests_not_a_few_groups() -> None:
    # beam-like: 22.4 calls per request of each LLM in groups of 6.67 (3.4 per request)
    policy = JointLlm("policy", MIX, calls=22.4, sizes=(4, 8, 8))
    prm = JointLlm("prm", MIX, calls=22.4, sizes=(4, 8, 8))
    wave = (0.0, (("policy", 60, 8), ("prm", 60, 1)))
    cfg = SweepConfig(window_s=4.0, min_groups=6)
    independent = JointSweep("http://unused", [policy, prm])
    ordered = JointSweep("http://unused", [policy, prm], requests=[ReplayRequest((wave,), 0.0)])
    # 0.3 requests/s: 1.0 groups/s of each LLM (mean group 6.67), 6 groups in 5.95 s;
    # 6 requests take 20 s, past the 3x cap
    assert independent.window_length(0.3, cfg) == pytest.approx(6 / (0.3 * 22.4 / (20 / 3)))
    assert ordered.window_length(0.3, cfg) == pytest.approx(12.0)
    assert ordered.window_length(1.0, cfg) == pytest.approx(6.0)
    # busy rates: the configured window either way
    assert ordered.window_length(3.0, cfg) == independent.window_length(3.0, cfg) == 4.0
