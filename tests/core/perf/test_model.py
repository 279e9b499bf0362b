"""The analytic performance model: rooflines, TP, fractions, MoE, KV capacity, fitted params.

Most expectations use IDEAL parameters (every efficiency 1, no overheads or latencies), so that
a step's time is a plain datasheet calculation written out in the comment next to it.
"""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from services.core.cluster.hardware import GIB, GPUS, gpu_spec
from services.core.cluster.models import model_spec
from services.core.errors import InfeasibleError, InvalidInputError
from services.core.perf import fit as perf_fit
from services.core.perf.model import (
    LINK_EFFICIENCY,
    RESERVE_GIB,
    TP_RESERVE_GIB,
    USABLE_MEMORY,
    PerfModel,
    PerfParams,
    StepLoad,
    chunk_pairs,
    load_params,
)

IDEAL = PerfParams(
    compute_eff=1.0,
    bandwidth_eff=1.0,
    kv_bandwidth_eff=1.0,
    attn_compute_eff=1.0,
    step_overhead_s=0.0,
    seq_overhead_s=0.0,
    allreduce_latency_s=0.0,
    allreduce_hop_s=0.0,
)
H100 = gpu_spec("H100-SXM")  # 989 TFLOP/s, 3.35 TB/s, NVLink 450 GB/s
LLAMA7 = model_spec("meta-llama/Llama-2-7b-hf")
LLAMA70 = model_spec("meta-llama/Llama-2-70b-hf")
DATA = (
    Path(__file__).resolve().parents[3].parent / "shared/data/llm-inference-bench/All_results.csv"
)


def ideal(model_name: str, tp: int = 1, fraction: float = 1.0, **params: float) -> PerfModel:
    return PerfModel.create(model_spec(model_name), H100, tp, fraction, replace(IDEAL, **params))


def test_decode_at_batch_one_is_bandwidth_bound() -> None:
    perf = ideal("meta-llama/Llama-2-7b-hf")
    t = perf.step_time(StepLoad(decode_seqs=1, decode_context=1))
    # every weight but the input embedding streams once: (6.738e9 - 0.131e9) x 2 B / 3.35e12 B/s
    weights = (LLAMA7.param_count - LLAMA7.vocab * LLAMA7.hidden) * 2
    assert t == pytest.approx(weights / 3.35e12, rel=1e-3)  # 3.94 ms
    assert t == pytest.approx(3.944e-3, rel=1e-3)
    # the FLOPs of one token (2 x 6.6e9 / 989e12 = 13 us) are far below it
    assert 2 * LLAMA7.active_param_count / 989e12 < t / 100


def test_large_prefill_is_compute_bound() -> None:
    perf = ideal("meta-llama/Llama-2-7b-hf")
    tokens = 16384
    t = perf.step_time(StepLoad(prefill_tokens=tokens, prefill_pairs=0, prefill_seqs=1))
    # 2 x 6.476e9 body weights x 16384 tokens + 2 x 131e6 (LM head, once) / 989e12 = 0.2146 s
    body = LLAMA7.active_param_count - LLAMA7.lm_head_params
    assert t == pytest.approx((2 * body * tokens + 2 * LLAMA7.lm_head_params) / 989e12, rel=1e-9)
    assert t == pytest.approx(0.2146, rel=1e-3)


def test_prefill_attention_adds_causal_pairs() -> None:
    perf = ideal("meta-llama/Llama-2-7b-hf")
    linear = perf.step_time(StepLoad(prefill_tokens=4096, prefill_seqs=1))
    with_attn = perf.step_time(
        StepLoad(prefill_tokens=4096, prefill_pairs=chunk_pairs(0, 4096), prefill_seqs=1)
    )
    # 4096 x 4097 / 2 pairs x 4 x 32 layers x 32 heads x 128 / 989e12 = 35.6 ms
    pairs = 4096 * 4097 / 2
    assert with_attn - linear == pytest.approx(pairs * 4 * 32 * 32 * 128 / 989e12, rel=1e-9)
    # a chunk after 1000 cached tokens attends to them too
    assert chunk_pairs(1000, 10) == 10 * 1000 + 55


def test_decode_attention_reads_the_kv_cache() -> None:
    perf = ideal("meta-llama/Llama-2-7b-hf")
    short = perf.step_time(StepLoad(decode_seqs=8, decode_context=8))
    long = perf.step_time(StepLoad(decode_seqs=8, decode_context=8 + 8 * 4096))
    # 8 x 4096 more cached tokens x 512 KiB / 3.35e12 B/s = 5.0 ms
    assert long - short == pytest.approx(8 * 4096 * 524288 / 3.35e12, rel=1e-9)


def test_tensor_parallel_halves_compute_and_adds_all_reduces() -> None:
    tokens = 16384
    load = StepLoad(prefill_tokens=tokens, prefill_seqs=1)
    t1 = ideal("meta-llama/Llama-2-70b-hf").step_time(load)
    t2 = ideal("meta-llama/Llama-2-70b-hf", tp=2, allreduce_latency_s=10e-6).step_time(load)
    # 2 all-reduces per layer + 2 (embedding, LM head) = 162; each: 10 us + ring transfer of
    # 2 x (2-1)/2 x 16384 tokens x 8192 x 2 B over 0.7 x 450 GB/s
    n_ar = 2 * 80 + 2
    ring = 2 * (1 / 2) * tokens * 8192 * 2 / (LINK_EFFICIENCY * 450e9)
    comm = n_ar * (10e-6 + ring)
    assert t2 == pytest.approx(t1 / 2 + comm, rel=1e-9)
    assert 0.5 < t2 / t1 < 0.6


def test_all_reduce_latency_grows_with_the_group() -> None:
    load = StepLoad(decode_seqs=1, decode_context=1)
    base = {"allreduce_latency_s": 20e-6, "allreduce_hop_s": 5e-6}
    t2 = ideal("meta-llama/Llama-2-70b-hf", tp=2, **base).step_time(load)
    t4 = ideal("meta-llama/Llama-2-70b-hf", tp=4, **base).step_time(load)
    t2_free = ideal("meta-llama/Llama-2-70b-hf", tp=2).step_time(load)
    t4_free = ideal("meta-llama/Llama-2-70b-hf", tp=4).step_time(load)
    # 162 all-reduces x 20 us at tp 2; x (20 + 2 x 5) us at tp 4
    assert t2 - t2_free == pytest.approx(162 * 20e-6, rel=1e-9)
    assert t4 - t4_free == pytest.approx(162 * 30e-6, rel=1e-9)


def test_fraction_scales_gpu_time_not_cpu_overhead() -> None:
    load = StepLoad(prefill_tokens=512, prefill_seqs=2, decode_seqs=30, decode_context=30_000)
    full = ideal("meta-llama/Meta-Llama-3-8B")
    half = ideal("meta-llama/Meta-Llama-3-8B", fraction=0.5)
    # MPS share: half the SMs and half the bandwidth -> twice the GPU time
    assert half.step_time(load) == pytest.approx(2 * full.step_time(load), rel=1e-12)
    overheads = {"step_overhead_s": 3e-3, "seq_overhead_s": 50e-6}
    full_o = ideal("meta-llama/Meta-Llama-3-8B", **overheads)
    half_o = ideal("meta-llama/Meta-Llama-3-8B", fraction=0.5, **overheads)
    cpu = 3e-3 + 32 * 50e-6  # 32 sequences in the step
    assert half_o.step_time(load) - cpu == pytest.approx(2 * (full_o.step_time(load) - cpu))


def test_moe_reads_only_touched_experts() -> None:
    m = model_spec("mistralai/Mixtral-8x7B-v0.1")
    perf = ideal("mistralai/Mixtral-8x7B-v0.1")
    one = perf.step_time(StepLoad(decode_seqs=1, decode_context=1))
    # batch 1: attention + router + LM head + 2 of 8 experts in each of 32 layers
    touched = m.layers * (m.attention_params + m.router_params + 2 * m.expert_params)
    active_bytes = (touched + m.lm_head_params) * 2
    assert one == pytest.approx(active_bytes / 3.35e12, rel=1e-3)  # 7.6 ms
    assert active_bytes < 0.3 * m.weight_bytes
    # 256 tokens touch all 8 experts (1 - (6/8)^256 ~ 1): every weight but the embedding,
    # 93.1e9 B / 3.35e12 = 27.8 ms, more than 256 x 2 x 12.75e9 FLOPs / 989e12 = 6.6 ms
    many = perf.step_time(StepLoad(decode_seqs=256, decode_context=256))
    all_bytes = (m.param_count - m.vocab * m.hidden) * 2
    assert many == pytest.approx(all_bytes / 3.35e12, rel=1e-3)


def test_decode_times_vectorised_equals_step_time() -> None:
    perf = PerfModel.create(LLAMA70, H100, 4, 1.0, load_params()["H100-SXM"])
    context = np.array([100.0, 5_000.0, 250_000.0])
    vector = perf.decode_times(64, context)
    for c, t in zip(context, vector, strict=True):
        assert t == pytest.approx(perf.step_time(StepLoad(decode_seqs=64, decode_context=c)))


def test_the_frontend_stage_sets_a_floor_per_sequence_not_a_sum() -> None:
    overheads = {"step_overhead_s": 4e-3, "seq_overhead_s": 1e-4}
    engine = ideal("meta-llama/Llama-2-7b-hf", **overheads)
    piped = ideal("meta-llama/Llama-2-7b-hf", frontend_seq_s=5e-4, **overheads)
    small = StepLoad(decode_seqs=2, decode_context=200)
    # 2 sequences: the frontend's 1 ms runs beside the engine's ~8 ms step and costs nothing
    assert piped.step_time(small) == engine.step_time(small)
    large = StepLoad(decode_seqs=64, decode_context=6400)
    # 64 sequences: the frontend's 32 ms is longer than the engine's own step (4 + 6.4 ms +
    # the weights); the step takes the frontend's time plus the attention over the context
    attention = 6400 * piped.s_per_kv_token
    assert piped.step_time(large) == pytest.approx(64 * 5e-4 + attention, rel=1e-12)
    assert piped.step_time(large) > engine.step_time(large)
    # still affine in the context, as the scheduler's closed form needs
    context = np.array([0.0, 6400.0, 12800.0])
    times = piped.decode_times(64, context)
    assert times[2] - times[1] == pytest.approx(times[1] - times[0], rel=1e-12)
    for c, t in zip(context, times, strict=True):
        assert t == pytest.approx(piped.step_time(StepLoad(decode_seqs=64, decode_context=c)))


def test_the_gpus_have_no_frontend_stage_or_call_overhead() -> None:
    for gpu, p in load_params().items():
        if gpu != "cpu":
            assert p.frontend_seq_s == 0.0 and p.call_overhead_s == 0.0


def test_kv_capacity_by_hand() -> None:
    m = model_spec("meta-llama/Meta-Llama-3-8B")
    perf = PerfModel.create(m, H100, 1, 1.0, IDEAL)
    # 80 GiB x 0.985 usable x 0.9 - 16.06e9 B weights
    #   - 8192 tokens x 2 B x (3 x 14336 + 6 x 4096) activations - 0.75 GiB reserve
    #   = 58.4e9 B; / 128 KiB per token = 445,000 tokens
    free = (
        80 * GIB * USABLE_MEMORY * 0.9
        - m.param_count * 2
        - 8192 * 2 * (3 * 14336 + 6 * 4096)
        - RESERVE_GIB * GIB
    )
    assert perf.kv_capacity_tokens(0.9, 8192) == int(free // 131072)
    assert 440_000 < perf.kv_capacity_tokens(0.9, 8192) < 450_000
    # tp 2: half the weights, activations and KV per GPU, plus the communication reserve
    perf2 = PerfModel.create(m, H100, 2, 1.0, IDEAL)
    free2 = (
        80 * GIB * USABLE_MEMORY * 0.9
        - m.param_count
        - 8192 * 2 * (3 * 14336 / 2 + 6 * 4096)
        - (RESERVE_GIB + TP_RESERVE_GIB) * GIB
    )
    assert perf2.kv_capacity_tokens(0.9, 8192) == int(free2 // 65536)


def test_kv_heads_replicate_beyond_their_count() -> None:
    # Qwen2.5-0.5B has 2 KV heads: at tp 4 each GPU still holds one whole KV head
    m = model_spec("Qwen/Qwen2.5-0.5B")
    short, long = (
        StepLoad(decode_seqs=1, decode_context=1),
        StepLoad(decode_seqs=1, decode_context=1e6),
    )
    # 1e6 cached tokens x 12 KiB / 2 heads per GPU / 3.35e12 B/s = 1.83 ms at tp 2 and at tp 4
    kv_gpu = 1e6 * m.kv_bytes_per_token / 2
    for tp in (2, 4):
        perf = PerfModel.create(m, H100, tp, 1.0, IDEAL)
        assert perf.step_time(long) - perf.step_time(short) == pytest.approx(
            (1e6 - 1) * m.kv_bytes_per_token / 2 / 3.35e12, rel=1e-9
        )
    assert kv_gpu / 3.35e12 == pytest.approx(1.834e-3, rel=1e-3)


@pytest.mark.parametrize(
    ("name", "gpu", "tp", "fraction"),
    [
        ("meta-llama/Llama-2-70b-hf", "H100-SXM", 1, 1.0),  # 138 GB of weights on 80 GB
        ("meta-llama/Meta-Llama-3-8B", "H100-SXM", 1, 0.125),  # 16 GB on a 9 GiB share
        ("Qwen/Qwen2.5-72B", "L40S", 2, 1.0),
    ],
)
def test_memory_infeasible(name: str, gpu: str, tp: int, fraction: float) -> None:
    perf = PerfModel.create(model_spec(name), gpu_spec(gpu), tp, fraction, IDEAL)
    with pytest.raises(InfeasibleError, match=r"needs .* GiB per GPU .* memory cap is"):
        perf.kv_capacity_tokens()


@pytest.mark.parametrize(
    ("tp", "fraction", "message"),
    [
        (3, 1.0, "tp: must be 1, 2, 4 or 8"),
        (1, 0.0, r"fraction: must be in \(0, 1\]"),
        (1, 1.5, r"fraction: must be in \(0, 1\]"),
        (2, 0.5, "needs tp 1"),
    ],
)
def test_invalid_configuration(tp: int, fraction: float, message: str) -> None:
    with pytest.raises(InvalidInputError, match=message):
        PerfModel.create(LLAMA7, H100, tp, fraction, IDEAL)


def test_tp_on_a_device_without_interconnect_is_invalid() -> None:
    with pytest.raises(InvalidInputError, match="interconnect"):
        PerfModel.create(model_spec("tiny-llama"), gpu_spec("cpu"), 2, 1.0, IDEAL)


def test_committed_params_cover_every_gpu() -> None:
    params = load_params()
    assert set(GPUS) <= set(params)
    p = params["H100-SXM"]
    assert 0 < p.compute_eff <= 1 and 0 < p.bandwidth_eff <= 1
    assert PerfParams.from_dict(p.to_dict()) == p
    with pytest.raises(InvalidInputError, match="compute_eff"):
        replace(p, compute_eff=1.5)


def test_fit_improves_its_start() -> None:
    # a synthetic fit split: rows measured with known parameters; the fit must move towards them
    truth = load_params()["H100-SXM"]
    rows = [
        perf_fit.BenchRow("Nvidia H100 GPU", tp, "vLLM", name, io, batch, 0.0, 0.0)
        for name, tp in (("meta-llama/Llama-2-7b-hf", 1), ("meta-llama/Llama-2-70b-hf", 4))
        for io in (128, 1024)
        for batch in (1, 32)
    ]
    rows = [replace(r, latency_s=perf_fit.predict_latency(r, truth)) for r in rows]
    start = replace(truth, bandwidth_eff=0.5, step_overhead_s=truth.step_overhead_s * 3)
    fitted = perf_fit.fit_params(rows, starts=(start,), iterations=60)

    def loss(p: PerfParams) -> float:
        return float(np.mean(perf_fit.log_errors(rows, p) ** 2))

    assert loss(fitted) < loss(start) / 10


@pytest.mark.skipif(not DATA.is_file(), reason="shared reference data not present")
def test_every_validation_row_gets_a_prediction() -> None:
    rows = perf_fit.read_rows(DATA)
    validation = perf_fit.validation_split(rows)
    fit = perf_fit.fit_split(rows)
    assert len(validation) == 523 and len(fit) == 81  # H100 369 + A100 235 vLLM rows, minus fit
    assert not {(r.hardware, r.model) for r in fit} & {(r.hardware, r.model) for r in validation}
    predictions = perf_fit.predict_rows(validation, load_params())
    assert all(p.latency_s is not None and math.isfinite(p.latency_s) for p in predictions)
    table = perf_fit.error_table(predictions)
    assert table[0]["group"] == "all" and table[0]["predicted"] == 523


def test_read_rows_reports_bad_lines(tmp_path: Path) -> None:
    bad = tmp_path / "rows.csv"
    bad.write_text(
        "Hardware,Num of Hardware,Framework,Model,Input Output Length,Batch Size,Latency,"
        "Throughput\nNvidia H100 GPU,one,vLLM,m,128,1,1.0,1.0\n"
    )
    with pytest.raises(InvalidInputError, match=r"rows\.csv:2: malformed row"):
        perf_fit.read_rows(bad)
    with pytest.raises(InvalidInputError, match="no such file"):
        perf_fit.read_rows(tmp_path / "missing.csv")
