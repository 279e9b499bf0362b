"""Continuous batching on the analytic performance model: a deterministic engine simulator.

``simulate`` replays requests (arrival time, prompt tokens, completion tokens) through a
vLLM-style scheduler and returns each request's first-token and finish times. Each iteration's
duration comes from ``PerfModel``. The scheduler mirrors vLLM's:

- at most ``max_num_seqs`` sequences run at once; an iteration computes at most
  ``max_batched_tokens`` tokens;
- with ``chunked_prefill`` (vLLM V1, the default) running sequences decode first and prompts fill
  the rest of the token budget, a long prompt in chunks over several iterations; without it
  (vLLM V0) an iteration either prefills whole prompts or decodes every running sequence, and
  prefills go first;
- a waiting request is admitted (first come, first served) only when its whole prompt fits in the
  free KV cache minus a small watermark; when decoding sequences outgrow the cache, the most
  recently admitted sequence is preempted and later recomputed (its prompt plus the tokens it had
  generated are prefilled again), as vLLM's recompute preemption does.

KV usage is counted in tokens (vLLM's 16-token blocks waste at most a block per sequence).
Stretches of pure decoding with nothing to admit are advanced in one vectorised jump up to the
next finish, KV overflow or arrival, which keeps a profile's worth of simulation fast.

``static_batch`` runs the offline benchmark the llm-inference-bench data set measures: ``batch``
identical requests submitted at once; latency is the time until the last token, throughput
batch x (input + output) / latency.
"""

from __future__ import annotations

import heapq
from collections import deque
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from services.core.errors import InvalidInputError
from services.core.perf import DEFAULT_MEMORY_UTILIZATION, FloatArray, PerfModel, StepLoad

IntArray = npt.NDArray[np.int64]


@dataclass(frozen=True, slots=True)
class SchedulerConfig:
    """Engine scheduling limits (vLLM flag names in comments)."""

    max_num_seqs: int = 256  # --max-num-seqs
    max_batched_tokens: int = 8192  # --max-num-batched-tokens
    chunked_prefill: bool = True  # --enable-chunked-prefill (always on in vLLM V1)
    memory_utilization: float = DEFAULT_MEMORY_UTILIZATION  # --gpu-memory-utilization
    watermark: float = 0.01  # share of the KV cache kept free when admitting a prompt

    def __post_init__(self) -> None:
        if self.max_num_seqs < 1:
            raise InvalidInputError(f"max_num_seqs: must be >= 1, got {self.max_num_seqs}")
        if self.max_batched_tokens < 1:
            raise InvalidInputError(
                f"max_batched_tokens: must be >= 1, got {self.max_batched_tokens}"
            )
        if not 0 <= self.watermark < 1:
            raise InvalidInputError(f"watermark: must be in [0, 1), got {self.watermark}")


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
) -> SimResult:
    """Run the requests through the engine; deterministic for the same inputs.

    ``arrival`` must be non-decreasing; ``prompt`` >= 1 and ``completion`` >= 1 tokens each.
    ``kv_capacity`` (tokens) overrides the perf model's KV-cache size. Raises
    ``InvalidInputError`` for a request that can never fit the KV cache or the token budget,
    ``InfeasibleError`` when the model does not fit the memory at all.
    """
    cfg = config or SchedulerConfig()
    n = len(arrival)
    arr = np.asarray(arrival, dtype=np.float64)
    p_len = np.asarray(prompt, dtype=np.int64)
    o_len = np.asarray(completion, dtype=np.int64)
    if not (len(p_len) == len(o_len) == n):
        raise InvalidInputError("simulate: arrival, prompt and completion differ in length")
    if n and (p_len.min() < 1 or o_len.min() < 1):
        raise InvalidInputError("simulate: prompt and completion must be >= 1 token")
    if n > 1 and np.any(np.diff(arr) < 0):
        raise InvalidInputError("simulate: arrival times must be non-decreasing")
    capacity = kv_capacity or perf.kv_capacity_tokens(
        cfg.memory_utilization, cfg.max_batched_tokens
    )
    longest = int((p_len + o_len).max()) if n else 0
    if longest + int(cfg.watermark * capacity) > capacity:
        raise InvalidInputError(
            f"simulate: a request of {longest} tokens exceeds the KV cache ({capacity} tokens)"
        )
    if not cfg.chunked_prefill and longest > cfg.max_batched_tokens:
        raise InvalidInputError(
            f"simulate: without chunked prefill a prompt must fit max_batched_tokens "
            f"({cfg.max_batched_tokens}); longest request has {longest} tokens"
        )
    return _Engine(perf, cfg, capacity, arr, p_len, o_len).run()


class _Engine:
    """Mutable state of one simulation run (private; ``simulate`` is the interface)."""

    def __init__(
        self,
        perf: PerfModel,
        cfg: SchedulerConfig,
        capacity: int,
        arrival: FloatArray,
        prompt: IntArray,
        completion: IntArray,
    ) -> None:
        self.perf, self.cfg, self.capacity = perf, cfg, capacity
        self.watermark = int(cfg.watermark * capacity)
        self.arrival = arrival
        self.prompt = [int(x) for x in prompt]
        self.out = [int(x) for x in completion]
        n = len(self.prompt)
        self.first = np.full(n, np.nan)
        self.finish = np.full(n, np.nan)
        self.gen = [0] * n  # tokens generated so far (valid while not decoding)
        self.need = [0] * n  # tokens the current admission must prefill
        self.prog = [0] * n  # of which computed
        self.fin_at = [0] * n  # decode counter value at which a decoding request finishes
        self.clock = 0.0
        self.decode_counter = 0
        self.waiting: deque[int] = deque()
        self.running: dict[int, None] = {}  # admission order; popitem() gives the newest
        self.prefilling: dict[int, None] = {}  # running requests still prefilling, in order
        self.heap: list[tuple[int, int]] = []  # (fin_at, request) of decoding requests
        self.decoding: set[int] = set()
        self.kv_used = 0  # tokens reserved in the KV cache
        self.dec_context = 0  # KV tokens held by decoding sequences
        self.next_arrival = 0
        self.done = 0
        self.preemptions = 0

    # --- bookkeeping -------------------------------------------------------------------------

    def _generated(self, i: int) -> int:
        return self.out[i] - (self.fin_at[i] - self.decode_counter)

    def _admit(self, i: int) -> None:
        self.waiting.popleft()
        self.need[i] = self.prompt[i] + self.gen[i]
        self.prog[i] = 0
        self.kv_used += self.need[i]
        self.running[i] = None
        self.prefilling[i] = None

    def _start_decoding(self, i: int) -> None:
        """Prefill of ``i`` finished at ``self.clock``: it emitted one token."""
        del self.prefilling[i]
        self.gen[i] += 1
        if np.isnan(self.first[i]):
            self.first[i] = self.clock
        if self.gen[i] >= self.out[i]:
            self._finish(i, self.need[i])
            return
        self.fin_at[i] = self.decode_counter + self.out[i] - self.gen[i]
        heapq.heappush(self.heap, (self.fin_at[i], i))
        self.decoding.add(i)
        self.dec_context += self.need[i]

    def _finish(self, i: int, kv_tokens: int) -> None:
        self.finish[i] = self.clock
        del self.running[i]
        self.kv_used -= kv_tokens
        self.done += 1

    def _preempt_newest(self) -> None:
        i, _ = self.running.popitem()
        self.preemptions += 1
        if i in self.decoding:
            self.decoding.discard(i)
            self.gen[i] = self._generated(i)
            kv = self.prompt[i] + self.gen[i] - 1
            self.dec_context -= kv
            self.kv_used -= kv
        else:
            del self.prefilling[i]
            self.kv_used -= self.need[i]
        self.waiting.appendleft(i)

    def _pop_finished(self) -> None:
        while self.heap and self.heap[0][0] <= self.decode_counter:
            fin, i = heapq.heappop(self.heap)
            if i not in self.decoding or self.fin_at[i] != fin:
                continue  # stale entry of a preempted request
            self.decoding.discard(i)
            kv = self.prompt[i] + self.out[i] - 1
            self.dec_context -= kv
            self.gen[i] = self.out[i]
            self._finish(i, kv)

    def _enqueue_arrivals(self) -> None:
        n = len(self.prompt)
        while self.next_arrival < n and self.arrival[self.next_arrival] <= self.clock:
            self.waiting.append(self.next_arrival)
            self.next_arrival += 1

    def _head_admissible(self) -> bool:
        if not self.waiting or len(self.running) >= self.cfg.max_num_seqs:
            return False
        i = self.waiting[0]
        need = self.prompt[i] + self.gen[i]
        return self.kv_used + need + self.watermark <= self.capacity

    # --- iterations --------------------------------------------------------------------------

    def run(self) -> SimResult:
        n = len(self.prompt)
        while self.done < n:
            self._enqueue_arrivals()
            if not self.running and not self.waiting:
                self.clock = max(self.clock, float(self.arrival[self.next_arrival]))
                continue
            if self.cfg.chunked_prefill:
                self._chunked_step()
            else:
                self._v0_step()
        return SimResult(
            arrival=self.arrival,
            first_token=self.first,
            finish=self.finish,
            completion_tokens=np.asarray(self.out, dtype=np.int64),
            preemptions=self.preemptions,
        )

    def _make_room_for_decode(self) -> None:
        while self.decoding and self.kv_used + len(self.decoding) > self.capacity:
            self._preempt_newest()

    def _v0_step(self) -> None:
        """vLLM V0: prefill-only iterations first, otherwise one decode iteration for all."""
        budget = self.cfg.max_batched_tokens
        chunks: list[int] = []
        while self._head_admissible():
            i = self.waiting[0]
            if self.prompt[i] + self.gen[i] > budget:
                break
            self._admit(i)
            budget -= self.need[i]
            chunks.append(i)
        if chunks:
            load = StepLoad(
                prefill_tokens=sum(self.need[i] for i in chunks),
                prefill_pairs=sum(self.need[i] * (self.need[i] + 1) / 2 for i in chunks),
                prefill_seqs=len(chunks),
            )
            self.clock += self.perf.step_time(load)
            for i in chunks:
                self.prog[i] = self.need[i]
                self._start_decoding(i)
            return
        self._make_room_for_decode()
        if not self.decoding:
            self._wait_for_arrival()
            return
        self._decode_run()

    def _chunked_step(self) -> None:
        """vLLM V1: decodes first, then prompt chunks up to the token budget, in one iteration."""
        self._make_room_for_decode()
        budget = self.cfg.max_batched_tokens - len(self.decoding)
        if not self.prefilling and not self._head_admissible():
            if self.decoding:
                self._decode_run()
            else:
                self._wait_for_arrival()
            return
        chunks: list[tuple[int, int]] = []
        for i in self.prefilling:
            if budget <= 0:
                break
            take = min(self.need[i] - self.prog[i], budget)
            chunks.append((i, take))
            budget -= take
        while budget > 0 and self._head_admissible():
            i = self.waiting[0]
            self._admit(i)
            take = min(self.need[i], budget)
            chunks.append((i, take))
            budget -= take
        n_dec = len(self.decoding)
        load = StepLoad(
            prefill_tokens=sum(take for _, take in chunks),
            prefill_pairs=sum(self.prog[i] * take + take * (take + 1) / 2 for i, take in chunks),
            prefill_seqs=len(chunks),
            decode_seqs=n_dec,
            decode_context=self.dec_context + n_dec,
        )
        self.clock += self.perf.step_time(load)
        if n_dec:
            self.decode_counter += 1
            self.kv_used += n_dec
            self.dec_context += n_dec
            self._pop_finished()
        for i, take in chunks:
            self.prog[i] += take
            if self.prog[i] >= self.need[i]:
                self._start_decoding(i)

    def _wait_for_arrival(self) -> None:
        if self.next_arrival >= len(self.prompt):
            raise InvalidInputError("simulate: requests can never be scheduled (limits too small)")
        self.clock = max(self.clock, float(self.arrival[self.next_arrival]))

    def _decode_run(self) -> None:
        """Decode iterations with an unchanged batch, up to the next event, in one jump."""
        n_dec = len(self.decoding)
        steps = self.heap[0][0] - self.decode_counter  # until the next finish
        steps = min(steps, max((self.capacity - self.kv_used) // n_dec, 1))
        # An arrival matters only when it could be admitted once it is there.
        arrival_matters = (
            self.next_arrival < len(self.prompt)
            and not self.waiting
            and len(self.running) < self.cfg.max_num_seqs
        )
        if steps == 1:
            times = self.perf.decode_times(n_dec, np.array([self.dec_context + n_dec], float))
        else:
            context = self.dec_context + n_dec * np.arange(1, steps + 1, dtype=np.float64)
            times = self.perf.decode_times(n_dec, context)
        ends = self.clock + np.cumsum(times)
        if arrival_matters:
            cut = int(np.searchsorted(ends, self.arrival[self.next_arrival], side="left"))
            steps = min(steps, cut + 1)
        self.clock = float(ends[steps - 1])
        self.decode_counter += steps
        self.kv_used += n_dec * steps
        self.dec_context += n_dec * steps
        self._pop_finished()


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
