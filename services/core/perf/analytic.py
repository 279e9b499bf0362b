"""The analytic profiler backend: latency-vs-rate curves from the engine simulator.

``profile_analytic`` produces the same ``Profile`` a real profiling sweep does, without hardware:

1. saturation: a large batch of requests (drawn from the mix, eight times the engine's
   concurrency) arrives at once; the completion rate between the 20th and 80th percentile of
   completions, while the engine is full and calls still queue, is the saturation rate T_m, the
   highest sustainable call rate (the window leaves out the ramp-up and the drain tail);
2. points: at each of ``RATE_FRACTIONS`` of the saturation rate, Poisson arrivals of
   ``requests_per_point`` requests with lengths drawn from the mix; per-call latency (mean, p50,
   p99), mean TTFT and mean TPOT, excluding the first ``WARMUP_SHARE`` of the requests (which
   meet an empty engine). All rates replay the same calls on the same (time-scaled) arrival
   pattern, and each statistic is carried as a running maximum over rising rates, so sampling
   noise cannot make latency fall as load grows.

Everything is seeded: the same arguments give the same profile. The request mix is the
distribution of (prompt, completion) token lengths the LLM sees: a fixed pair or an empirical
sample (e.g. ``LlmStats.sample`` from a trace), drawn uniformly with replacement.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, replace

import numpy as np

from services.core.cluster.hardware import GpuSpec
from services.core.cluster.models import ModelSpec
from services.core.errors import InfeasibleError, InvalidInputError
from services.core.perf.batching import IntArray, SchedulerConfig, simulate
from services.core.perf.model import FloatArray, PerfModel, PerfParams
from services.core.perf.profile import Profile, ProfileKey, ProfilePoint

ENGINE = "analytic-1"  # bump when the model or the simulator changes what a profile says
RATE_FRACTIONS: tuple[float, ...] = (0.1, 0.25, 0.4, 0.55, 0.7, 0.8, 0.9, 0.95)
REQUESTS_PER_POINT = 400
# What planning profiles with (``backends.AnalyticBackend``): the curve is flat at low rates, so
# fewer points there, and half the requests per point; the objective stays within 1% of the
# full resolution's (``scripts/bench_search.py`` measures it).
PLANNING_RATE_FRACTIONS: tuple[float, ...] = (0.1, 0.4, 0.6, 0.75, 0.85, 0.95)
PLANNING_REQUESTS_PER_POINT = 200
PLANNING_SATURATION_WINDOW = (0.2, 0.8)
WARMUP_SHARE = 0.1
SATURATION_WINDOW = (0.2, 0.8)  # completions measured by ``saturation_rate`` (shares)
BURST_SIZES: tuple[int, ...] = (1, 2, 4, 8, 16, 32)
BURST_CALLS = 64  # calls simulated per burst size (bursts of b: BURST_CALLS // b trials, >= 3)


@dataclass(frozen=True, slots=True)
class RequestMix:
    """(prompt tokens, completion tokens) samples of one LLM's calls, drawn with replacement."""

    id: str  # short, stable identifier (part of the profile key)
    samples: tuple[tuple[int, int], ...]

    def __post_init__(self) -> None:
        if not self.samples:
            raise InvalidInputError(f"request mix {self.id!r}: samples: empty")
        for prompt, completion in self.samples:
            if prompt < 1 or completion < 1:
                raise InvalidInputError(
                    f"request mix {self.id!r}: samples: token counts must be >= 1, "
                    f"got ({prompt}, {completion})"
                )

    @classmethod
    def fixed(cls, prompt: int, completion: int) -> RequestMix:
        return cls(f"fixed-{prompt}-{completion}", ((prompt, completion),))

    @classmethod
    def from_samples(cls, samples: Sequence[tuple[int, int]], id: str | None = None) -> RequestMix:
        """A mix of observed calls. Zero counts become 1: an engine call always reads and
        writes at least one token. The default id hashes the samples."""
        pairs = tuple((max(int(p), 1), max(int(c), 1)) for p, c in samples)
        if id is None:
            digest = hashlib.sha256(repr(pairs).encode()).hexdigest()[:10]
            id = f"sample-{len(pairs)}-{digest}"
        return cls(id, pairs)

    @property
    def mean_prompt(self) -> float:
        return float(np.mean([p for p, _ in self.samples]))

    @property
    def mean_completion(self) -> float:
        return float(np.mean([c for _, c in self.samples]))

    @property
    def longest(self) -> int:
        return max(p + c for p, c in self.samples)

    def draw(self, n: int, rng: np.random.Generator) -> tuple[IntArray, IntArray]:
        """``n`` (prompt, completion) pairs drawn uniformly with replacement."""
        table = np.asarray(self.samples, dtype=np.int64)
        if len(table) == 1:
            return np.repeat(table[:, 0], n), np.repeat(table[:, 1], n)
        idx = rng.integers(0, len(table), size=n)
        return table[idx, 0], table[idx, 1]


def saturation_rate(
    perf: PerfModel,
    mix: RequestMix,
    seed: int = 0,
    config: SchedulerConfig | None = None,
    requests: int | None = None,
    window: tuple[float, float] = SATURATION_WINDOW,
) -> float:
    """Calls/s the engine sustains when it always has work (see the module docstring).

    ``window``: the completions measured, as shares of ``requests`` (the simulation stops at
    the window's end: what follows cannot change the times inside it)."""
    if not 0 <= window[0] < window[1] < 1:
        raise InvalidInputError(f"saturation window: must be 0 <= lo < hi < 1, got {window}")
    cfg = config or SchedulerConfig()
    if requests is None:
        capacity = perf.kv_capacity_tokens(cfg.memory_utilization, cfg.max_batched_tokens)
        mean_tokens = mix.mean_prompt + mix.mean_completion
        concurrency = min(cfg.max_num_seqs, max(1, int(capacity / mean_tokens)))
        requests = max(8 * concurrency, 200)
    rng = np.random.default_rng([seed, 0])
    prompt, completion = mix.draw(requests, rng)
    # Completions between the 20th and 80th percentile (by default): the engine is full and
    # calls still queue (the queue empties only after about (requests - concurrency)
    # completions), while the ramp-up and the drain tail (a few long calls finishing alone) stay
    # outside the window. Completions come in time order, so the run can stop at the window's
    # end; the rest of the calls keep NaN times, which sort last.
    lo, hi = int(window[0] * requests), int(window[1] * requests)
    arrival = np.zeros(requests)
    result = simulate(perf, arrival, prompt, completion, cfg, stop_after=hi + 1)
    finish = np.sort(result.finish)
    span = float(finish[hi] - finish[lo])
    if span > 0:
        return (hi - lo) / span
    return requests / simulate(perf, arrival, prompt, completion, cfg).makespan


def _point(
    perf: PerfModel,
    rate: float,
    unit_arrival: FloatArray,
    prompt: IntArray,
    completion: IntArray,
    config: SchedulerConfig,
) -> ProfilePoint:
    result = simulate(perf, unit_arrival / rate, prompt, completion, config)
    keep = slice(int(len(prompt) * WARMUP_SHARE), None)
    latency = result.latency[keep]
    multi = result.completion_tokens[keep] > 1
    tpot = result.tpot[keep][multi]
    p50, p99 = np.percentile(latency, [50, 99])
    return ProfilePoint(
        rate=rate,
        mean_latency=float(latency.mean()),
        p50_latency=float(p50),
        p99_latency=float(p99),
        ttft=float(result.ttft[keep].mean()),
        tpot=float(tpot.mean()) if tpot.size else 0.0,
    )


def _monotone(points: list[ProfilePoint]) -> tuple[ProfilePoint, ...]:
    """Latency never falls as the rate rises: carry the running maximum of every statistic."""
    out: list[ProfilePoint] = [points[0]]
    for p in points[1:]:
        q = out[-1]
        out.append(
            replace(
                p,
                mean_latency=max(p.mean_latency, q.mean_latency),
                p50_latency=max(p.p50_latency, q.p50_latency),
                p99_latency=max(p.p99_latency, q.p99_latency),
                ttft=max(p.ttft, q.ttft),
                tpot=max(p.tpot, q.tpot),
            )
        )
    return tuple(out)


def burst_latencies(
    perf: PerfModel,
    mix: RequestMix,
    seed: int = 0,
    config: SchedulerConfig | None = None,
    sizes: Sequence[int] = BURST_SIZES,
) -> tuple[tuple[int, float], ...]:
    """(b, mean per-call latency) of ``b`` calls handed to an idle instance at once, per size.

    A workflow that fans out hands its parallel calls to a replica together; they share the
    iterations (a burst of prompts fills the token budget and queues) and each takes longer
    than a lone call. Trials of each size run in one simulation, far enough apart that they
    never overlap; calls come from the mix (common random numbers across sizes). A trial of the
    same calls as an earlier one (a mix of one pair, or the pool's wrap-around) would repeat its
    latencies on an idle engine: it is simulated once and counted as often as it occurs.
    """
    cfg = config or SchedulerConfig()
    rng = np.random.default_rng([seed, 2])
    pool_p, pool_c = mix.draw(BURST_CALLS, rng)
    out: list[tuple[int, float]] = []
    for b in sorted(set(sizes)):
        if b < 1:
            raise InvalidInputError(f"burst sizes: must be >= 1, got {b}")
        trials = max(3, BURST_CALLS // b)
        idx = (np.arange(trials * b) % BURST_CALLS).reshape(trials, b)
        counts: dict[bytes, int] = {}
        firsts: list[int] = []  # the first trial of each distinct set of calls
        for k in range(trials):
            key = pool_p[idx[k]].tobytes() + pool_c[idx[k]].tobytes()
            if key not in counts:
                counts[key] = 0
                firsts.append(k)
            counts[key] += 1
        chosen = idx[firsts].ravel()
        # every trial starts on an idle engine: later than any burst can last
        gap = 1e6
        arrival = np.repeat(np.arange(len(firsts), dtype=np.float64) * gap, b)
        result = simulate(perf, arrival, pool_p[chosen], pool_c[chosen], cfg)
        per_trial = result.latency.reshape(len(firsts), b).sum(axis=1)
        weights = np.array(list(counts.values()), dtype=np.float64)
        out.append((b, float(per_trial @ weights / (trials * b))))
    return tuple(out)


def profile_analytic(
    model: ModelSpec,
    gpu: GpuSpec,
    tp: int,
    fraction: float,
    mix: RequestMix,
    seed: int = 0,
    *,
    config: SchedulerConfig | None = None,
    params: PerfParams | None = None,
    rate_fractions: Sequence[float] = RATE_FRACTIONS,
    requests_per_point: int = REQUESTS_PER_POINT,
    saturation_window: tuple[float, float] = SATURATION_WINDOW,
) -> Profile:
    """The latency-vs-rate profile of ``model`` on ``tp`` GPUs (or a ``fraction`` of one).

    Raises ``InfeasibleError`` when the weights plus a minimal KV cache do not fit the memory
    cap, or when the mix's longest call does not fit the KV cache; ``InvalidInputError`` for
    malformed arguments.
    """
    cfg = config or SchedulerConfig()
    if requests_per_point < 10:
        raise InvalidInputError(f"requests_per_point: must be >= 10, got {requests_per_point}")
    fractions = sorted(rate_fractions)
    if not fractions or fractions[0] <= 0 or fractions[-1] >= 1:
        raise InvalidInputError(f"rate_fractions: must lie in (0, 1), got {list(rate_fractions)}")
    perf = PerfModel.create(model, gpu, tp, fraction, params)
    capacity = perf.kv_capacity_tokens(cfg.memory_utilization, cfg.max_batched_tokens)
    if mix.longest + int(cfg.watermark * capacity) > capacity:
        raise InfeasibleError(
            f"model {model.name} on {gpu.name} tp {tp} fraction {fraction:g}: the KV cache holds "
            f"{capacity} tokens, the mix {mix.id!r} has calls of {mix.longest} tokens"
        )
    saturation = saturation_rate(perf, mix, seed, cfg, window=saturation_window)
    # Common random numbers: every rate sees the same calls and the same arrival pattern, only
    # compressed in time, so the curve's differences come from the load and not from sampling.
    rng = np.random.default_rng([seed, 1])
    gaps = rng.exponential(1.0, size=requests_per_point)
    unit_arrival = np.cumsum(gaps) - gaps[0]
    prompt, completion = mix.draw(requests_per_point, rng)
    points = _monotone(
        [_point(perf, f * saturation, unit_arrival, prompt, completion, cfg) for f in fractions]
    )
    key = ProfileKey(model.name, gpu.name, tp, fraction, ENGINE, mix.id)
    return Profile(key=key, points=points, saturation_rate=saturation)
