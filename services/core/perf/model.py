"""Analytic performance model: the time of one engine iteration and the KV-cache capacity.

One iteration (a vLLM "step") runs a batch through the model once: some prompt tokens being
prefilled (``StepLoad.prefill_tokens``, possibly chunks of several prompts) and some sequences
decoding one token each (``decode_seqs``, attending over ``decode_context`` cached tokens in all).
Its time on one tensor-parallel group, all GPUs in lockstep, is the sum of

- a roofline term for the weight matmuls: max(FLOPs / achievable compute, weight bytes /
  achievable bandwidth). At small batches the weights stream from HBM once per step (memory
  bound); at large ones the FLOPs dominate (compute bound). For a MoE model the bytes are those of
  the experts the step's tokens touch: with T tokens each routed to k of E experts, a layer reads
  E * (1 - (1 - k/E)^T) experts in expectation (k at T = 1, all E for large T); the FLOPs are
  those of the k active experts per token;
- prefill attention FLOPs (query-key pairs of the causal prompt chunks; compute bound);
- decode attention: max(KV bytes read / achievable bandwidth, FLOPs / achievable compute);
- tensor parallelism: two all-reduces per layer (after attention and after the MLP) plus two for
  the vocabulary-parallel embedding and LM head, each costing a latency that grows with the group
  size and a ring transfer of 2 (t-1)/t of the activations over NVLink (PCIe without NVLink);
- a fixed per-step overhead (scheduling, launch) plus a per-sequence overhead (sampling,
  bookkeeping), both on the CPU and so independent of the GPU share;
- the frontend (the API server streaming each sequence's token) runs beside the iteration as a
  second pipeline stage: the iteration's time without its attention terms is at least
  ``frontend_seq_s`` per sequence (0 for the GPUs; calibrated for the ``cpu`` device, whose
  measured latency stays flat with the load and then turns up sharply at a token rate the
  frontend, not the engine, sets).

A GPU fraction f < 1 (an MPS share) scales both the compute and the bandwidth available to the
engine by f: MPS limits the SMs a client may use, and an engine on fewer SMs also issues fewer
concurrent memory requests, so we assume both shrink in proportion. The CPU overheads do not
scale. Memory is capped separately at f * memory * gpu_memory_utilization.

Efficiencies per GPU type (``PerfParams``) are fitted on measured data by ``perf_fit``; the
committed values live in ``params.json`` beside this module (regenerate with
``scripts/bench_perf.py --refit --write``). Whole batches and request streams are run through
this model by the scheduler simulator in ``batching`` (``static_batch``, ``simulate``).
"""

from __future__ import annotations

import json
import math
from dataclasses import MISSING, asdict, dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from services.core.cluster.hardware import GIB, GpuSpec
from services.core.cluster.models import ModelSpec
from services.core.errors import InfeasibleError, InvalidInputError, NotFoundError

FloatArray = npt.NDArray[np.float64]

PARAMS_FILE = Path(__file__).with_name("params.json")
DEFAULT_MEMORY_UTILIZATION = 0.9  # vLLM's --gpu-memory-utilization default
MIN_KV_TOKENS = 256  # an instance that cannot hold this many tokens of KV cache is infeasible
LINK_EFFICIENCY = 0.7  # achieved / peak link bandwidth of NCCL ring all-reduce (not fitted)
# Memory outside weights and KV cache (not fitted: the data constrain it only weakly).
USABLE_MEMORY = 0.985  # what the driver exposes of the nominal size (A100 40 GB: 39.4 GiB)
RESERVE_GIB = 0.75  # allocator slack, cuBLAS workspaces, the sampler's buffers for max_num_seqs
TP_RESERVE_GIB = 1.0  # NCCL communicators and custom all-reduce buffers when tp > 1


@dataclass(frozen=True, slots=True)
class PerfParams:
    """Achievable efficiencies and overheads of one GPU type (all fitted, see ``perf_fit``)."""

    compute_eff: float  # achieved / peak dense BF16 FLOP/s of the matmuls and attention
    bandwidth_eff: float  # achieved / peak HBM bandwidth when streaming the weights
    kv_bandwidth_eff: float  # achieved / peak HBM bandwidth of paged decode attention
    attn_compute_eff: float  # achieved / peak FLOP/s of paged decode attention (CUDA cores)
    step_overhead_s: float  # per iteration, CPU side (scheduler, launches, broadcast)
    seq_overhead_s: float  # per sequence in the iteration, CPU side (sampling, bookkeeping)
    allreduce_latency_s: float  # fixed latency of one all-reduce in a TP group of 2
    allreduce_hop_s: float  # added latency per further GPU in the group
    # per call, outside the engine's iterations: the client's request reaching the scheduler
    # and the last token reaching the client (HTTP, tokenisation, the router's hop). Calibrated
    # for the ``cpu`` device, whose frontends share the cores; 0 (not fitted) for the GPUs.
    call_overhead_s: float = 0.0
    # per sequence of an iteration, the engine's frontend (the API server process: output
    # processing, detokenisation, streaming each sequence's new token to its client). It runs
    # beside the engine's iterations, not inside them: an iteration lasts at least the frontend's
    # time for its sequences (a pipeline whose slower stage sets the pace). So it costs nothing
    # while the engine's own step is longer, and caps the token rate at 1 / frontend_seq_s once
    # batches grow. Calibrated for ``cpu`` (the frontend competes for the host's cores); 0 for the
    # GPUs (their step times are measured inside the engine).
    frontend_seq_s: float = 0.0

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if not (math.isfinite(value) and value >= 0):
                raise InvalidInputError(f"perf params: {f.name}: must be >= 0, got {value!r}")
        for name in ("compute_eff", "bandwidth_eff", "kv_bandwidth_eff", "attn_compute_eff"):
            if not 0 < getattr(self, name) <= 1:
                raise InvalidInputError(f"perf params: {name}: must be in (0, 1]")

    def to_dict(self) -> dict[str, float]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PerfParams:
        names = {f.name for f in fields(cls)}
        optional = {f.name for f in fields(cls) if f.default is not MISSING}
        missing = names - optional - data.keys()
        if missing:
            raise InvalidInputError(f"perf params: missing {', '.join(sorted(missing))}")
        return cls(**{name: float(data[name]) for name in names if name in data})


def load_params(path: Path = PARAMS_FILE) -> dict[str, PerfParams]:
    """The committed per-GPU parameters: ``{gpu type: PerfParams}``."""
    raw = json.loads(path.read_text())
    return {gpu: PerfParams.from_dict(values) for gpu, values in raw["gpus"].items()}


_PARAMS_CACHE: dict[str, PerfParams] = {}


def params_for(gpu: GpuSpec) -> PerfParams:
    """Committed parameters for ``gpu`` (every catalogue GPU has an entry)."""
    if not _PARAMS_CACHE:
        _PARAMS_CACHE.update(load_params())
    try:
        return _PARAMS_CACHE[gpu.name]
    except KeyError:
        raise NotFoundError(
            f"gpu type {gpu.name!r} has no performance parameters in {PARAMS_FILE.name}"
        ) from None


@dataclass(frozen=True, slots=True)
class StepLoad:
    """The work of one iteration."""

    prefill_tokens: int = 0  # prompt tokens computed this step (all chunks)
    prefill_pairs: float = 0.0  # causal (query, key) pairs of those chunks, summed
    prefill_seqs: int = 0  # sequences with a prefill chunk this step
    decode_seqs: int = 0  # sequences generating one token each
    decode_context: float = 0.0  # tokens those sequences attend over, summed


def chunk_pairs(start: int, tokens: int) -> float:
    """Causal attention pairs of a chunk of ``tokens`` positions after ``start`` cached ones."""
    return tokens * start + tokens * (tokens + 1) / 2


@dataclass(frozen=True, slots=True)
class PerfModel:
    """Iteration-time model of one engine instance: a model on ``tp`` GPUs, or on a fraction.

    Build it with ``PerfModel.create``; the coefficients are seconds per unit of work.
    """

    model: ModelSpec
    gpu: GpuSpec
    tp: int
    fraction: float
    params: PerfParams
    # seconds per unit (derived)
    s_per_token_flops: float
    s_per_sample_flops: float
    s_dense_weights: float
    s_expert_weights: float  # one expert in every layer
    s_per_pair: float  # prefill attention (tensor cores)
    s_per_decode_pair: float  # decode attention FLOPs per context token
    s_per_kv_token: float
    s_comm_fixed: float
    s_comm_per_token: float

    @classmethod
    def create(
        cls,
        model: ModelSpec,
        gpu: GpuSpec,
        tp: int = 1,
        fraction: float = 1.0,
        params: PerfParams | None = None,
    ) -> PerfModel:
        if tp not in (1, 2, 4, 8):
            raise InvalidInputError(f"tp: must be 1, 2, 4 or 8, got {tp}")
        if not 0 < fraction <= 1:
            raise InvalidInputError(f"fraction: must be in (0, 1], got {fraction}")
        if fraction < 1 and tp > 1:
            raise InvalidInputError(f"fraction: {fraction} < 1 needs tp 1, got tp {tp}")
        if gpu.peak_bf16_flops <= 0 or gpu.hbm_bandwidth <= 0:
            raise InvalidInputError(f"gpu {gpu.name!r}: peak FLOP/s and bandwidth must be > 0")
        p = params or params_for(gpu)
        m = model
        flops = p.compute_eff * gpu.peak_bf16_flops * fraction * tp  # whole group
        bw = p.bandwidth_eff * gpu.hbm_bandwidth * fraction * tp
        kv_bw = p.kv_bandwidth_eff * gpu.hbm_bandwidth * fraction * tp
        body = m.active_param_count - m.lm_head_params
        dense_bytes = (m.layers * (m.attention_params + m.router_params) + m.lm_head_params) * (
            m.dtype_bytes
        )
        # KV heads are split over the group; with fewer KV heads than GPUs they are replicated.
        kv_token = m.kv_bytes_per_token * max(tp, m.kv_heads) / m.kv_heads
        s_comm_fixed = s_comm_per_token = 0.0
        if tp > 1:
            n_allreduce = 2 * m.layers + 2
            link = gpu.nvlink_bandwidth or gpu.pcie_bandwidth
            if link <= 0:
                raise InvalidInputError(f"tp: {tp} needs a GPU interconnect; {gpu.name} has none")
            latency = p.allreduce_latency_s + p.allreduce_hop_s * (tp - 2)
            s_comm_fixed = n_allreduce * latency
            ring = 2 * (tp - 1) / tp * m.hidden * m.dtype_bytes / (LINK_EFFICIENCY * link)
            s_comm_per_token = n_allreduce * ring
        return cls(
            model=m,
            gpu=gpu,
            tp=tp,
            fraction=fraction,
            params=p,
            s_per_token_flops=2 * body / flops,
            s_per_sample_flops=2 * m.lm_head_params / flops,
            s_dense_weights=dense_bytes / bw,
            s_expert_weights=m.layers * m.expert_params * m.dtype_bytes / bw,
            s_per_pair=m.attention_flops(1.0) / flops,
            s_per_decode_pair=m.attention_flops(1.0)
            / (p.attn_compute_eff * gpu.peak_bf16_flops * fraction * tp),
            s_per_kv_token=kv_token / kv_bw,
            s_comm_fixed=s_comm_fixed,
            s_comm_per_token=s_comm_per_token,
        )

    # --- iteration time ------------------------------------------------------------------

    def _experts_read(self, tokens: float) -> float:
        m = self.model
        if m.experts == 1:
            return 1.0
        return float(m.experts * (1.0 - (1.0 - m.active_experts / m.experts) ** tokens))

    def step_time(self, load: StepLoad) -> float:
        """Seconds of one iteration running ``load``."""
        return self.step_seconds(
            load.prefill_tokens,
            load.prefill_pairs,
            load.prefill_seqs,
            load.decode_seqs,
            load.decode_context,
        )

    def step_seconds(
        self,
        prefill_tokens: int,
        prefill_pairs: float,
        prefill_seqs: int,
        decode_seqs: int,
        decode_context: float,
    ) -> float:
        """``step_time`` of the ``StepLoad`` with these fields, in order (the scheduler's hot
        path calls it without building one): ``step_fixed`` plus the decode attention."""
        if prefill_tokens + decode_seqs == 0:
            return 0.0
        fixed = self.step_fixed(prefill_tokens, prefill_pairs, prefill_seqs, decode_seqs)
        return fixed + decode_context * self.context_seconds

    @property
    def context_seconds(self) -> float:
        """Seconds per token of context that decoding sequences attend over (the attention
        reads its KV cache or computes its FLOPs, whichever takes longer)."""
        return max(self.s_per_kv_token, self.s_per_decode_pair)

    def step_fixed(
        self, prefill_tokens: int, prefill_pairs: float, prefill_seqs: int, decode_seqs: int
    ) -> float:
        """An iteration's seconds without the decode attention (``step_seconds`` is this plus
        the context attended times ``context_seconds``); 0 without any token."""
        tokens = prefill_tokens + decode_seqs
        seqs = prefill_seqs + decode_seqs
        if tokens == 0:
            return 0.0
        p = self.params
        compute = self.s_per_token_flops * tokens + self.s_per_sample_flops * seqs
        memory = self.s_dense_weights + self.s_expert_weights * self._experts_read(tokens)
        engine = (
            p.step_overhead_s
            + p.seq_overhead_s * seqs
            + self.s_comm_fixed
            + self.s_comm_per_token * tokens
            + max(compute, memory)
        )
        # the frontend's stage in parallel (``PerfParams.frontend_seq_s``; 0: the engine's)
        return max(engine, p.frontend_seq_s * seqs) + self.s_per_pair * prefill_pairs

    def decode_times(self, seqs: int, context: FloatArray) -> FloatArray:
        """Times of consecutive pure-decode iterations of ``seqs`` sequences (vectorised).

        ``context[j]`` is the summed context of iteration j. Equals ``step_time`` of each.
        """
        fixed, per_ctx = self._decode_terms(seqs)
        return fixed + per_ctx * context

    def decode_coefficients(self, seqs: int) -> tuple[float, float]:
        """(a, b): one pure-decode iteration of ``seqs`` sequences over a summed context of c
        tokens takes a + b c; exactly ``decode_times(seqs, [0.0, 1.0])`` as (t0, t1 - t0)."""
        fixed, per_ctx = self._decode_terms(seqs)
        a = fixed + per_ctx * 0.0
        return a, (fixed + per_ctx * 1.0) - a

    def _decode_terms(self, seqs: int) -> tuple[float, float]:
        """(time of a pure-decode iteration of ``seqs`` sequences without attention, seconds
        per token of context attended)."""
        p = self.params
        compute = self.s_per_token_flops * seqs + self.s_per_sample_flops * seqs
        memory = self.s_dense_weights + self.s_expert_weights * self._experts_read(seqs)
        per_ctx = max(self.s_per_kv_token, self.s_per_decode_pair)
        fixed = max(
            p.step_overhead_s
            + p.seq_overhead_s * seqs
            + self.s_comm_fixed
            + self.s_comm_per_token * seqs
            + max(compute, memory),
            p.frontend_seq_s * seqs,
        )
        return fixed, per_ctx

    # --- memory --------------------------------------------------------------------------

    def kv_capacity_tokens(
        self,
        memory_utilization: float = DEFAULT_MEMORY_UTILIZATION,
        max_batched_tokens: int = 8192,
    ) -> int:
        """Tokens of KV cache the instance can hold (summed over its sequences).

        Per GPU, as vLLM sizes its cache: the memory cap (fraction x usable memory x
        utilization) minus this GPU's share of the weights, minus the activation peak of a
        ``max_batched_tokens`` forward pass, minus a fixed reserve (``RESERVE_GIB``, plus
        ``TP_RESERVE_GIB`` for communication buffers when tp > 1). Raises ``InfeasibleError``
        when fewer than ``MIN_KV_TOKENS`` fit.
        """
        if not 0 < memory_utilization <= 1:
            raise InvalidInputError(
                f"memory_utilization: must be in (0, 1], got {memory_utilization}"
            )
        m, t = self.model, self.tp
        cap = self.gpu.memory_bytes * USABLE_MEMORY * self.fraction * memory_utilization
        weights = m.weight_bytes / t
        # The largest live activations: the MLP's gate/up output and its activation, the QKV
        # output and a few hidden-size buffers for one full token budget.
        activation = (
            max_batched_tokens
            * m.dtype_bytes
            * (3 * m.intermediate * m.active_experts / t + 6 * m.hidden)
        )
        reserve = (RESERVE_GIB + (TP_RESERVE_GIB if t > 1 else 0.0)) * GIB
        free = cap - weights - activation - reserve
        kv_per_gpu_token = m.kv_bytes_per_token * max(t, m.kv_heads) / m.kv_heads / t
        tokens = int(free // kv_per_gpu_token) if free > 0 else 0
        if tokens < MIN_KV_TOKENS:
            need = (weights + activation + reserve + MIN_KV_TOKENS * kv_per_gpu_token) / GIB
            raise InfeasibleError(
                f"model {m.name} on {self.gpu.name} tp {t} fraction {self.fraction:g}: "
                f"needs {need:.1f} GiB per GPU (weights {weights / GIB:.1f} GiB + activations "
                f"{activation / GIB:.1f} GiB + reserve {reserve / GIB:.1f} GiB + "
                f"{MIN_KV_TOKENS} tokens of KV cache), the memory cap is {cap / GIB:.1f} GiB"
            )
        return tokens
