"""The simulator's per-replica engine: hand-computed cases, equivalence with batching.simulate."""

from __future__ import annotations

import numpy as np
import pytest

from services.core.cluster.hardware import gpu_spec
from services.core.cluster.models import model_spec
from services.core.errors import InvalidInputError
from services.core.perf.batching import SchedulerConfig, simulate, static_batch
from services.core.perf.model import PerfModel, StepLoad, chunk_pairs, load_params
from services.core.perf.scheduler import BatchEngine

H100 = gpu_spec("H100-SXM")
PERF = PerfModel.create(
    model_spec("meta-llama/Llama-3.1-8B"), H100, 1, 1.0, load_params()["H100-SXM"]
)
V0 = SchedulerConfig(chunked_prefill=False)
V1 = SchedulerConfig()


def drain(engine: BatchEngine) -> None:
    """Run the engine until idle, as the event loop does (finish, then start the next)."""
    while engine.wake is not None:
        now = engine.wake
        engine.finish_iteration(now)
        engine.start_iteration(now)


def feed(
    engine: BatchEngine, arrival: np.ndarray, prompt: np.ndarray, completion: np.ndarray
) -> None:
    """Submit calls at their arrival times, as the event loop does: iterations ending at or
    before an arrival finish first, and calls arriving together start one iteration together."""
    i, n = 0, len(arrival)
    while i < n:
        t = float(arrival[i])
        while engine.wake is not None and engine.wake <= t:
            now = engine.wake
            engine.finish_iteration(now)
            if now < t:
                engine.start_iteration(now)
        while i < n and float(arrival[i]) == t:
            engine.submit(t, int(prompt[i]), int(completion[i]), start=False)
            i += 1
        engine.start_iteration(t)
    drain(engine)


@pytest.mark.parametrize("config", [V0, V1], ids=["v0", "v1"])
def test_one_call_alone_is_one_prefill_then_decodes(config: SchedulerConfig) -> None:
    engine = BatchEngine(PERF, config)
    engine.submit(2.0, 700, 50)
    drain(engine)
    # the prefill of 700 tokens (one step) emits the first token at 2 + prefill; then 49 decode
    # steps, step j attending over 700 + j cached tokens
    prefill = PERF.step_time(
        StepLoad(prefill_tokens=700, prefill_pairs=chunk_pairs(0, 700), prefill_seqs=1)
    )
    decodes = sum(
        PERF.step_time(StepLoad(decode_seqs=1, decode_context=700 + j)) for j in range(1, 50)
    )
    assert engine.first_token[0] == pytest.approx(2.0 + prefill, rel=1e-12)
    assert engine.finish[0] == pytest.approx(2.0 + prefill + decodes, rel=1e-9)
    assert engine.outstanding == 0
    assert engine.iterations == 50  # 1 prefill + 49 decodes


def test_saturated_engine_runs_at_the_batch_throughput() -> None:
    # 4 waves of B identical calls at t=0 with max_num_seqs = B: V0 prefills a wave (B x 512
    # tokens fit the 8192 budget), decodes it to the end together, then admits the next wave;
    # so the engine completes B calls per static-batch latency, the model's batch throughput
    batch, waves, length = 16, 4, 512
    config = SchedulerConfig(max_num_seqs=batch, chunked_prefill=False)
    latency, tokens_per_s = static_batch(PERF, batch, length, length, config)
    engine = BatchEngine(PERF, config)
    n = batch * waves
    feed(engine, np.zeros(n), np.full(n, length), np.full(n, length))
    makespan = max(engine.finish)
    assert makespan == pytest.approx(waves * latency, rel=1e-9)
    assert n * 2 * length / makespan == pytest.approx(tokens_per_s, rel=1e-9)


@pytest.mark.parametrize(
    "config", [V0, V1, SchedulerConfig(max_num_seqs=8, max_batched_tokens=1024)]
)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_matches_batching_simulate_on_random_loads(config: SchedulerConfig, seed: int) -> None:
    # the same scheduler driven by events gives the same times as the batch simulator, with
    # preemption (capacity 20,000 tokens on odd seeds) and with runs cut short by arrivals
    rng = np.random.default_rng(seed)
    n = 300
    arrival = np.cumsum(rng.exponential(1 / (5 + 20 * seed), n))
    prompt = rng.integers(1, 3000 if config.chunked_prefill else 1000, n)
    completion = rng.integers(1, 600, n)
    capacity = 20_000 if seed % 2 else None
    reference = simulate(PERF, arrival, prompt, completion, config, capacity)
    engine = BatchEngine(PERF, config, capacity)
    feed(engine, arrival, prompt, completion)
    assert np.array(engine.finish) == pytest.approx(reference.finish, rel=1e-9)
    assert np.array(engine.first_token) == pytest.approx(reference.first_token, rel=1e-9)
    assert engine.preemptions == reference.preemptions


def test_decode_iteration_time_is_affine_in_context() -> None:
    # the engine jumps over decode runs in closed form; that needs t(context) = a + b context
    context = np.array([0.0, 1.0, 1e3, 5e4, 2e5])
    for seqs in (1, 7, 64):
        t = PERF.decode_times(seqs, context)
        a, b = t[0], t[1] - t[0]
        assert t == pytest.approx(a + b * context, rel=1e-12)


def test_a_call_submitted_while_idle_starts_at_once_unless_held() -> None:
    engine = BatchEngine(PERF)
    engine.submit(1.0, 100, 1, start=False)
    assert engine.wake is None  # held: the caller starts the iteration
    engine.submit(1.0, 100, 1, start=False)
    engine.start_iteration(1.0)
    both = PERF.step_time(
        StepLoad(prefill_tokens=200, prefill_pairs=2 * chunk_pairs(0, 100), prefill_seqs=2)
    )
    assert engine.wake == pytest.approx(1.0 + both)
    assert engine.finish_iteration(engine.wake) == [0, 1]


def test_a_call_that_can_never_fit_is_refused() -> None:
    engine = BatchEngine(PERF, kv_capacity=1000)
    with pytest.raises(InvalidInputError, match="exceeds the KV cache"):
        engine.submit(0.0, 900, 200)
    with pytest.raises(InvalidInputError, match=">= 1 token"):
        engine.submit(0.0, 0, 5)
