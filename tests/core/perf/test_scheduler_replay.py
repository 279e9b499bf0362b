"""The fast paths of profile computation give what the plain paths give.

``BatchEngine.replay`` (what ``simulate`` runs) against the engine's event interface driven one
call at a time; ``saturation_rate``'s early stop against the whole run; burst trials simulated
once per distinct set of calls against every trial; profiles computed by a process pool against
profiles computed here.
"""

from __future__ import annotations

import multiprocessing
from concurrent.futures import ProcessPoolExecutor

import numpy as np
import pytest

from services.core.cluster.hardware import gpu_spec
from services.core.cluster.models import model_spec
from services.core.perf.analytic import (
    BURST_CALLS,
    RequestMix,
    burst_latencies,
    saturation_rate,
)
from services.core.perf.backends import AnalyticBackend, clear_cache
from services.core.perf.batching import simulate
from services.core.perf.model import PerfModel
from services.core.perf.scheduler import BatchEngine, SchedulerConfig
from services.core.planning.plan import spec_from_text
from services.core.planning.profiles import SpecProfiles, spec_configs

H100 = gpu_spec("H100-SXM")


def _event_loop(
    engine: BatchEngine, arrival: list[float], prompt: list[int], completion: list[int]
) -> None:
    """The event interface as the workflow simulator drives it, one call at a time."""
    i, n = 0, len(arrival)
    while i < n:
        t = arrival[i]
        while engine.wake is not None and engine.wake <= t:
            now = engine.wake
            engine.finish_iteration(now)
            if now < t:
                engine.start_iteration(now)
        while i < n and arrival[i] == t:
            engine.submit(t, prompt[i], completion[i], start=False)
            i += 1
        engine.start_iteration(t)
    while engine.wake is not None:
        now = engine.wake
        engine.finish_iteration(now)
        engine.start_iteration(now)


def _cases() -> list[
    tuple[PerfModel, SchedulerConfig, int | None, np.ndarray, np.ndarray, np.ndarray]
]:
    rng = np.random.default_rng(11)
    cases = []
    for k in range(40):
        arch = ("meta-llama/Llama-3.1-8B", "Qwen/Qwen2.5-0.5B")[k % 2]
        perf = PerfModel.create(model_spec(arch), H100, 1, (1.0, 0.5, 0.25)[k % 3])
        chunked = k % 4 != 0
        budget = int(rng.choice([512, 2048, 8192]))
        cfg = SchedulerConfig(
            max_num_seqs=int(rng.choice([4, 16, 256])),
            max_batched_tokens=budget,
            chunked_prefill=chunked,
        )
        n = int(rng.integers(5, 150))
        prompt = rng.integers(1, 400, n)
        completion = rng.integers(1, 300, n)
        if not chunked:
            prompt = np.minimum(prompt, budget - 300)
        shape = k % 4
        if shape == 0:
            arrival = np.zeros(n)
        elif shape == 1:
            arrival = np.cumsum(rng.exponential(0.02, n))
        elif shape == 2:
            arrival = np.repeat(np.arange((n + 3) // 4) * 0.5, 4)[:n]
        else:
            arrival = np.round(np.cumsum(rng.exponential(0.05, n)), 2)
        kv = int(rng.choice([1000, 3000])) if k % 2 else None  # small caches preempt
        cases.append((perf, cfg, kv, arrival.astype(float), prompt, completion))
    return cases


def test_replay_equals_the_event_interface_call_by_call() -> None:
    preemptions = 0
    for perf, cfg, kv, arrival, prompt, completion in _cases():
        fast = BatchEngine(perf, cfg, kv)
        fast.replay(arrival.tolist(), prompt.tolist(), completion.tolist())
        plain = BatchEngine(perf, cfg, kv)
        _event_loop(plain, arrival.tolist(), prompt.tolist(), completion.tolist())
        assert fast.first_token == plain.first_token
        assert fast.finish == plain.finish
        assert (fast.preemptions, fast.iterations) == (plain.preemptions, plain.iterations)
        preemptions += fast.preemptions
    assert preemptions > 0  # the cases reach the preemption paths


def test_replay_can_stop_after_some_calls_finished() -> None:
    perf = PerfModel.create(model_spec("Qwen/Qwen2.5-0.5B"), H100)
    n = 300
    rng = np.random.default_rng(2)
    prompt, completion = rng.integers(50, 2000, n), rng.integers(1, 300, n)
    whole = simulate(perf, np.zeros(n), prompt, completion)
    part = simulate(perf, np.zeros(n), prompt, completion, stop_after=120)
    done = ~np.isnan(part.finish)
    assert done.sum() >= 120
    assert np.array_equal(np.sort(part.finish[done]), np.sort(whole.finish)[: done.sum()])


@pytest.mark.parametrize("mix", [RequestMix.fixed(800, 200), RequestMix.fixed(2000, 1)])
def test_saturation_stops_early_without_changing_the_rate(mix: RequestMix) -> None:
    perf = PerfModel.create(model_spec("meta-llama/Llama-3.1-8B"), H100, 1, 0.5)
    cfg = SchedulerConfig()
    requests = 400
    rng = np.random.default_rng([0, 0])
    prompt, completion = mix.draw(requests, rng)
    finish = np.sort(simulate(perf, np.zeros(requests), prompt, completion, cfg).finish)
    lo, hi = int(0.2 * requests), int(0.8 * requests)
    expected = (hi - lo) / float(finish[hi] - finish[lo])
    assert saturation_rate(perf, mix, 0, cfg, requests=requests) == expected


def test_burst_trials_of_the_same_calls_are_simulated_once() -> None:
    perf = PerfModel.create(model_spec("Qwen/Qwen2.5-1.5B"), H100, 1, 0.5)
    mix = RequestMix.fixed(700, 90)
    table = dict(burst_latencies(perf, mix, sizes=(1, 4, 32)))
    for b in (1, 4, 32):
        one = simulate(perf, np.zeros(b), np.full(b, 700), np.full(b, 90))
        assert table[b] == pytest.approx(float(one.latency.mean()), rel=1e-9)
    # a mix of many pairs: every trial differs, the pool's wrap-around repeats some (b = 32)
    rng = np.random.default_rng(5)
    sampled = RequestMix.from_samples([tuple(x) for x in rng.integers(1, 1500, (50, 2))])
    b = 32
    trials = max(3, BURST_CALLS // b)
    pool_p, pool_c = sampled.draw(BURST_CALLS, np.random.default_rng([0, 2]))
    idx = np.arange(trials * b) % BURST_CALLS
    every = simulate(
        perf, np.repeat(np.arange(trials) * 1e6, b), pool_p[idx], pool_c[idx]
    ).latency.mean()
    assert dict(burst_latencies(perf, sampled, sizes=(b,)))[b] == pytest.approx(every, rel=1e-6)


SPEC = """
version: 1
fraction_unit: 2
cluster: {gpu_type: H100-SXM, gpus: 2}
models:
  A: Qwen/Qwen2.5-0.5B
  B: Qwen/Qwen2.5-1.5B
workflows:
  - name: w
    rate: 1.0
    stats:
      stages: [[A, B]]
      llms:
        A: {n: 2, prompt_tokens: 300, completion_tokens: 40}
        B: {n: 1, prompt_tokens: 500, completion_tokens: 60}
"""


def test_profiles_computed_by_a_pool_equal_those_computed_here() -> None:
    spec = spec_from_text(SPEC)
    configs = spec_configs(spec)
    clear_cache()
    here = SpecProfiles(spec)
    assert here.cold(configs) == configs
    here.prefetch(configs, map)
    expected = {c: here.profile(*c) for c in configs}
    assert here.cold(configs) == []
    clear_cache()
    pooled = SpecProfiles(spec)
    with ProcessPoolExecutor(2, mp_context=multiprocessing.get_context("fork")) as pool:
        pooled.prefetch(configs, pool.map)
    assert {c: pooled.profile(*c) for c in configs} == expected
    # the backend remembers what the workers computed: a new source computes nothing
    assert SpecProfiles(spec).cold(configs) == []
    assert AnalyticBackend().remembered(
        spec.models["A"], H100, 1, 0.5, pooled.query("A", 1, 0.5).mix, 0
    )
