"""Continuous batching over a list of requests known in advance, and static batches.

``simulate`` replays requests (arrival time, prompt tokens, completion tokens) through one
engine's scheduler (``services.core.perf.scheduler.BatchEngine``: vLLM-style continuous
batching, iteration times from ``PerfModel``) and returns each request's first-token and
finish times. A request is first considered for the first iteration that starts at or after
its arrival, as in vLLM.

``static_batch`` runs the offline benchmark the llm-inference-bench data set measures: ``batch``
identical requests submitted at once; latency is the time until the last token, throughput
batch x (input + output) / latency.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from services.core.errors import InvalidInputError
from services.core.perf.model import FloatArray, PerfModel
from services.core.perf.scheduler import BatchEngine, SchedulerConfig

__all__ = ["IntArray", "SchedulerConfig", "SimResult", "simulate", "static_batch"]

IntArray = npt.NDArray[np.int64]


@dataclass(frozen=True, slots=True)
class SimResult:
    """Per-request times (seconds from the start of the simulation), in input order."""

    arrival: FloatArray
    first_token: FloatArray
    finish: FloatArray
    completion_tokens: IntArray
    preemptions: int

    @property
    def latency(self) -> FloatArray:
        return self.finish - self.arrival

    @property
    def ttft(self) -> FloatArray:
        return self.first_token - self.arrival

    @property
    def tpot(self) -> FloatArray:
        """Mean time per output token after the first (0 for one-token completions)."""
        steps = np.maximum(self.completion_tokens - 1, 1)
        return np.where(self.completion_tokens > 1, (self.finish - self.first_token) / steps, 0.0)

    @property
    def makespan(self) -> float:
        return float(self.finish.max()) if self.finish.size else 0.0


def simulate(
    perf: PerfModel,
    arrival: FloatArray,
    prompt: IntArray,
    completion: IntArray,
    config: SchedulerConfig | None = None,
    kv_capacity: int | None = None,
    stop_after: int | None = None,
) -> SimResult:
    """Run the requests through the engine; deterministic for the same inputs.

    ``arrival`` must be non-decreasing; ``prompt`` >= 1 and ``completion`` >= 1 tokens each.
    ``kv_capacity`` (tokens) overrides the perf model's KV-cache size. ``stop_after``: stop
    once every request has arrived and at least this many have finished; the others keep NaN
    times (the first ``stop_after`` finish times are exactly those of the whole run). Raises
    ``InvalidInputError`` for a request that can never fit the KV cache or the token budget,
    ``InfeasibleError`` when the model does not fit the memory at all.
    """
    arr = np.asarray(arrival, dtype=np.float64)
    p_len = np.asarray(prompt, dtype=np.int64)
    o_len = np.asarray(completion, dtype=np.int64)
    if not (len(p_len) == len(o_len) == len(arr)):
        raise InvalidInputError("simulate: arrival, prompt and completion differ in length")
    if len(arr) > 1 and np.any(np.diff(arr) < 0):
        raise InvalidInputError("simulate: arrival times must be non-decreasing")
    engine = BatchEngine(perf, config, kv_capacity)
    # each call reaches the scheduler ``call_overhead_s`` after it was sent (a constant shift:
    # the engine's queueing is unchanged, every latency and TTFT grows by it)
    overhead = perf.params.call_overhead_s
    engine.replay((arr + overhead).tolist(), p_len.tolist(), o_len.tolist(), stop_after)
    if engine.outstanding and stop_after is None:
        raise InvalidInputError("simulate: requests can never be scheduled (limits too small)")
    return SimResult(
        arrival=arr,
        first_token=np.array(engine.first_token, dtype=np.float64),
        finish=np.array(engine.finish, dtype=np.float64),
        completion_tokens=o_len,
        preemptions=engine.preemptions,
    )


def static_batch(
    perf: PerfModel,
    batch: int,
    input_len: int,
    output_len: int,
    config: SchedulerConfig | None = None,
    kv_capacity: int | None = None,
) -> tuple[float, float]:
    """(latency s, throughput tokens/s) of ``batch`` identical requests submitted together.

    The llm-inference-bench definition: latency until the batch's last token; throughput
    batch x (input_len + output_len) / latency. The first output token comes out of the prefill;
    the other output_len - 1 from decode iterations over a growing context. When the batch's KV
    cache does not fit, the scheduler queues and preempts exactly as in ``simulate``.
    """
    if batch < 1 or input_len < 1 or output_len < 1:
        raise InvalidInputError(
            f"static batch: batch, input_len and output_len must be >= 1, "
            f"got {batch}, {input_len}, {output_len}"
        )
    zeros = np.zeros(batch)
    result = simulate(
        perf,
        zeros,
        np.full(batch, input_len, dtype=np.int64),
        np.full(batch, output_len, dtype=np.int64),
        config,
        kv_capacity,
    )
    latency = result.makespan
    return latency, batch * (input_len + output_len) / latency
