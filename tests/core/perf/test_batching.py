"""The engine simulator, static batches and analytic profiles."""

from __future__ import annotations

import time

import numpy as np
import pytest

from services.core.cluster.hardware import gpu_spec
from services.core.cluster.models import model_spec
from services.core.errors import InfeasibleError, InvalidInputError
from services.core.perf.analytic import (
    PLANNING_RATE_FRACTIONS,
    RATE_FRACTIONS,
    RequestMix,
    burst_latencies,
    profile_analytic,
    saturation_rate,
)
from services.core.perf.backends import AnalyticBackend, clear_cache
from services.core.perf.batching import SchedulerConfig, simulate, static_batch
from services.core.perf.model import PerfModel, StepLoad, chunk_pairs, load_params

H100 = gpu_spec("H100-SXM")
LLAMA8 = model_spec("meta-llama/Llama-3.1-8B")
PERF = PerfModel.create(LLAMA8, H100, 1, 1.0, load_params()["H100-SXM"])
V0 = SchedulerConfig(max_batched_tokens=8192, chunked_prefill=False)
V1 = SchedulerConfig()


def decode_sum(perf: PerfModel, seqs: int, prompt: int, output: int) -> float:
    """Time of the output - 1 decode steps of ``seqs`` equal sequences after their prefill:
    step j (1-based) attends over prompt + j tokens per sequence."""
    return sum(
        perf.step_time(StepLoad(decode_seqs=seqs, decode_context=seqs * (prompt + j)))
        for j in range(1, output)
    )


@pytest.mark.parametrize("config", [V0, V1], ids=["v0", "v1"])
def test_single_request_is_prefill_plus_decodes(config: SchedulerConfig) -> None:
    prompt, output = 700, 50
    result = simulate(PERF, np.zeros(1), np.array([prompt]), np.array([output]), config)
    prefill = PERF.step_time(
        StepLoad(prefill_tokens=prompt, prefill_pairs=chunk_pairs(0, prompt), prefill_seqs=1)
    )
    # the prefill emits the first token; 49 decode steps over 701..749 cached tokens follow
    assert result.ttft[0] == pytest.approx(prefill, rel=1e-12)
    assert result.latency[0] == pytest.approx(prefill + decode_sum(PERF, 1, prompt, output))
    assert result.tpot[0] == pytest.approx((result.latency[0] - prefill) / (output - 1))


def test_long_prompt_is_chunked_by_the_token_budget() -> None:
    config = SchedulerConfig(max_batched_tokens=1000)
    result = simulate(PERF, np.zeros(1), np.array([2500]), np.array([1]), config)
    # chunks of 1000, 1000 and 500 tokens, each attending to what was computed before
    chunks = [(0, 1000), (1000, 1000), (2000, 500)]
    expected = sum(
        PERF.step_time(StepLoad(prefill_tokens=n, prefill_pairs=chunk_pairs(s, n), prefill_seqs=1))
        for s, n in chunks
    )
    assert result.latency[0] == pytest.approx(expected)


def test_requests_far_apart_do_not_interact() -> None:
    one = simulate(PERF, np.zeros(1), np.array([300]), np.array([20]))
    two = simulate(PERF, np.array([0.0, 100.0]), np.array([300, 300]), np.array([20, 20]))
    assert two.latency == pytest.approx([one.latency[0]] * 2)
    assert two.finish[1] == pytest.approx(100.0 + one.latency[0])


def test_static_batch_that_fits_is_one_prefill_then_batched_decodes() -> None:
    batch, length = 8, 512
    latency, throughput = static_batch(PERF, batch, length, length, V0)
    # V0: all 8 prompts (4096 tokens <= 8192) in one prefill step, then 511 decode steps of 8
    prefill = PERF.step_time(
        StepLoad(
            prefill_tokens=batch * length,
            prefill_pairs=batch * chunk_pairs(0, length),
            prefill_seqs=batch,
        )
    )
    assert latency == pytest.approx(prefill + decode_sum(PERF, batch, length, length))
    assert throughput == pytest.approx(batch * 2 * length / latency)


def test_static_batch_over_kv_capacity_queues_and_preempts() -> None:
    batch, length = 16, 1024
    free_latency, _ = static_batch(PERF, batch, length, length, V0)
    # room for 12k tokens: 12 prompts admitted, then preempted as their contexts grow to 2048
    result = simulate(
        PERF,
        np.zeros(batch),
        np.full(batch, length),
        np.full(batch, length),
        V0,
        kv_capacity=12_000,
    )
    assert result.preemptions > 0
    assert result.makespan > 1.5 * free_latency
    assert np.all(result.finish >= result.first_token)


@pytest.mark.parametrize("config", [V0, V1], ids=["v0", "v1"])
def test_every_request_finishes_in_order_of_its_events(config: SchedulerConfig) -> None:
    rng = np.random.default_rng(7)
    n = 300
    arrival = np.cumsum(rng.exponential(0.02, n))
    prompt = rng.integers(1, 3000, n)
    output = rng.integers(1, 400, n)
    result = simulate(PERF, arrival, prompt, output, config, kv_capacity=60_000)
    assert not np.isnan(result.finish).any()
    assert np.all(result.first_token >= result.arrival)
    assert np.all(result.finish >= result.first_token)
    one_token = output == 1
    assert np.all(result.finish[one_token] == result.first_token[one_token])


def test_simulation_is_deterministic() -> None:
    rng = np.random.default_rng(3)
    arrival = np.cumsum(rng.exponential(0.05, 200))
    prompt, output = rng.integers(10, 2000, 200), rng.integers(1, 300, 200)
    a = simulate(PERF, arrival, prompt, output)
    b = simulate(PERF, arrival, prompt, output)
    assert np.array_equal(a.finish, b.finish) and np.array_equal(a.first_token, b.first_token)


def test_saturated_throughput_approaches_static_batch_throughput() -> None:
    mix = RequestMix.fixed(512, 256)
    rate = saturation_rate(PERF, mix)
    # a full engine runs 256 sequences: the static batch of 256 is the same work
    latency, _ = static_batch(PERF, 256, 512, 256)
    assert rate == pytest.approx(256 / latency, rel=0.1)


@pytest.mark.parametrize(
    ("arrival", "prompt", "output", "message"),
    [
        ([0.0, 1.0], [10], [10, 10], "differ in length"),
        ([1.0, 0.0], [10, 10], [10, 10], "non-decreasing"),
        ([0.0], [0], [10], ">= 1 token"),
        ([0.0], [10_000], [10], "exceeds the KV cache"),
    ],
)
def test_simulate_rejects_bad_input(
    arrival: list[float], prompt: list[int], output: list[int], message: str
) -> None:
    with pytest.raises(InvalidInputError, match=message):
        simulate(PERF, np.array(arrival), np.array(prompt), np.array(output), kv_capacity=5000)


# --- request mixes and analytic profiles ---------------------------------------------------------


def test_request_mix() -> None:
    fixed = RequestMix.fixed(100, 20)
    assert fixed.id == "fixed-100-20" and fixed.longest == 120
    sampled = RequestMix.from_samples([(5, 0), (0, 3), (10, 10)])
    assert sampled.samples == ((5, 1), (1, 3), (10, 10))  # a call reads and writes >= 1 token
    assert sampled.id == RequestMix.from_samples([(5, 0), (0, 3), (10, 10)]).id
    assert sampled.mean_prompt == pytest.approx(16 / 3)
    with pytest.raises(InvalidInputError, match="samples: empty"):
        RequestMix("x", ())
    with pytest.raises(InvalidInputError, match=">= 1"):
        RequestMix("x", ((0, 5),))


def test_profile_shape_and_speed() -> None:
    mix = RequestMix.fixed(1024, 256)
    started = time.monotonic()
    profile = profile_analytic(LLAMA8, H100, 1, 1.0, mix, seed=1)
    elapsed = time.monotonic() - started
    assert elapsed < 5.0  # typically ~0.1 s; generous for a shared machine
    assert profile.key.model == LLAMA8.name and profile.key.mix == "fixed-1024-256"
    assert len(profile.points) == len(RATE_FRACTIONS)
    rates = [p.rate for p in profile.points]
    assert rates == pytest.approx([f * profile.saturation_rate for f in RATE_FRACTIONS])
    latencies = [p.mean_latency for p in profile.points]
    assert latencies == sorted(latencies)
    # nearly idle: latency close to one request alone (prefill + 255 decode steps)
    alone = simulate(PERF, np.zeros(1), np.array([1024]), np.array([256])).latency[0]
    assert profile.points[0].mean_latency == pytest.approx(alone, rel=0.25)
    assert profile.points[-1].mean_latency > 1.5 * profile.points[0].mean_latency
    for p in profile.points:
        assert p.p99_latency >= p.p50_latency and 0 < p.ttft < p.mean_latency and p.tpot > 0


def test_profile_is_deterministic_by_seed() -> None:
    rng = np.random.default_rng(0)
    mix = RequestMix.from_samples(
        [(int(a), int(b)) for a, b in rng.integers(50, 1500, size=(100, 2))]
    )
    small = model_spec("Qwen/Qwen2.5-1.5B")
    a = profile_analytic(small, H100, 1, 0.5, mix, seed=5, requests_per_point=200)
    b = profile_analytic(small, H100, 1, 0.5, mix, seed=5, requests_per_point=200)
    c = profile_analytic(small, H100, 1, 0.5, mix, seed=6, requests_per_point=200)
    assert a == b
    assert a.points != c.points


def test_fraction_lowers_saturation() -> None:
    mix = RequestMix.fixed(512, 128)
    full = profile_analytic(LLAMA8, H100, 1, 1.0, mix, requests_per_point=100)
    half = profile_analytic(LLAMA8, H100, 1, 0.5, mix, requests_per_point=100)
    assert half.saturation_rate < 0.75 * full.saturation_rate


@pytest.mark.parametrize(
    ("name", "tp", "fraction", "mix", "message"),
    [
        ("meta-llama/Llama-2-70b-hf", 1, 1.0, RequestMix.fixed(100, 10), "GiB per GPU"),
        ("meta-llama/Llama-3.1-8B", 1, 0.125, RequestMix.fixed(100, 10), "GiB per GPU"),
        ("meta-llama/Llama-3.1-8B", 1, 0.25, RequestMix.fixed(200_000, 10), "KV cache holds"),
    ],
)
def test_profile_infeasible(
    name: str, tp: int, fraction: float, mix: RequestMix, message: str
) -> None:
    with pytest.raises(InfeasibleError, match=message):
        profile_analytic(model_spec(name), H100, tp, fraction, mix)


# ------------------------------------------------------------------------------ bursts, planning
def test_a_burst_of_prompts_waits_for_the_token_budget() -> None:
    # prompt-only calls (one output token): b of them together need b x 3000 prompt tokens,
    # more than one iteration's budget from b = 3 on, so per-call latency grows with b
    perf = PerfModel.create(LLAMA8, H100, 1, 1.0)
    table = dict(burst_latencies(perf, RequestMix.fixed(3000, 1), sizes=(1, 2, 4, 8)))
    assert table[1] < table[4] < table[8]
    lone = simulate(perf, np.zeros(1), np.array([3000]), np.array([1])).latency[0]
    assert table[1] == pytest.approx(lone)


def test_planning_backend_remembers_profiles_by_what_they_depend_on() -> None:
    clear_cache()
    mix = RequestMix.fixed(256, 32)
    small = model_spec("Qwen/Qwen2.5-0.5B")
    backend = AnalyticBackend()
    first = backend.profile(small, H100, 1, 0.5, mix, 0)
    assert len(first.points) == len(PLANNING_RATE_FRACTIONS)
    assert AnalyticBackend().profile(small, H100, 1, 0.5, mix, 0) is first  # another instance
    other = backend.profile(small, H100, 1, 0.5, mix, 1)  # another seed: computed anew
    assert other is not first
    clear_cache()
    again = backend.profile(small, H100, 1, 0.5, mix, 0)
    assert again is not first and again == first  # deterministic
