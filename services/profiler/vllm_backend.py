"""The ``vllm`` profiler backend: latency against load, measured on a real vLLM engine.

For (model, GPU type, TP, fraction) it starts an engine with the launch code of
``services.runtime.engines`` (``EngineSpec``, ``LocalEngine``), or attaches to a running one
(``endpoint``), and drives it with the model's request mix (``RequestMix``: prompt and
completion lengths from a trace, or fixed). A sweep:

1. warm-up calls (not measured), then the idle latency: a few calls one after another;
2. a probe: a burst of calls sent at once; their completion rate is the first estimate of the
   engine's capacity X;
3. rising offered rates ``RATE_STEPS x X``. At each rate calls arrive as a Poisson process
   (``mode="poisson"``) or, in fan-out mode, groups of ``fanout`` calls arrive together as
   workflows send them (the groups are Poisson at rate / fanout). The first ``warmup_s`` of each
   rate fill the engine; the calls arriving in the next ``window_s`` are measured: latency mean,
   p50, p99, TTFT, TPOT, achieved throughput (calls completed inside the window per second) and
   errors. A failed call is a result (counted, with its reason), never the end of the sweep;
4. the sweep stops at saturation: the engine falls behind (of the calls that arrived in the
   window, more than ``1 - keep_up`` of them and at least ``min_behind`` calls were not matched
   by completions inside it: the throughput stops following the rate), or mean latency passes
   ``latency_bound`` x the idle latency, at ``confirm`` rates in a row (on a shared host one
   window can be a stall: with ``recheck`` a rate that looks saturated is measured once more
   and the second window counts, twice when it fell behind too; windows that fell behind are
   not profile points); or when the next rate would not fit ``budget_s``.
   Completions count every call finishing inside the window (warm-up arrivals too), so that at
   a sustainable rate they match the arrivals up to Poisson noise;
5. the probe's burst can over-state the steady capacity several times on a busy host, so that
   the first step or two are already past it. A sweep that stopped saturated with fewer than
   ``min_points`` profile points fills in rates below the saturation rate: the fractions
   k / (min_points + 1) of it, less those within half a step of a profile point's rate
   (``fill_rates``), in rising order, each measured as a step is (recheck and saturation check
   included), as long as the next one fits ``budget_s``. A filled-in rate that falls behind is
   kept, marked saturated, and is no profile point; while points are still short, the next
   round fills in below the lowest such rate (``FILL_ROUNDS`` rounds at most). When no call
   completed at all (an engine stalled from the first rate on), the fill-in goes below the
   lowest rate tried.
   ``method["filled_rates"]`` lists the rates filled in, in the order measured.

The profile's saturation rate is the highest throughput achieved at a rate (filled-in rates
included); its points are the rates below it that had successful calls and did not fall behind
(``Measurement.points`` holds every rate measured, sorted by rate). The key's engine is
``vllm-<version>`` as the engine reports it (``GET /version``), so profiles of different engine
versions never mix; how it was measured (``Measurement.method``) is stored with it
(``Store.put_measured_profile``).
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import os
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from itertools import pairwise
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np

from services.core.cluster.hardware import GpuSpec
from services.core.cluster.models import ModelSpec
from services.core.errors import InfeasibleError, InvalidInputError, UnavailableError
from services.core.perf.analytic import RequestMix
from services.core.perf.profile import Profile, ProfileKey, ProfilePoint
from services.core.placement.rules import Assignment
from services.core.serving import EngineIntent
from services.core.workload.spec import ModelServing
from services.runtime.driver import CallOutcome, direct_session, send_completion
from services.runtime.engines import EngineSpec, LocalEngine, engine_venv
from services.runtime.launch import LaunchHost, device_of
from services.runtime.launch import engine_spec as launch_spec

ENGINE_PREFIX = "vllm"
RATE_STEPS: tuple[float, ...] = (0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.75, 0.9, 1.05, 1.2, 1.4)
MODEL_DIRS_ENV = "SCEPSY_MODEL_DIRS"  # "name=path,name=path": where to load catalogue models from
CPU_GPU = "cpu"
MODES = ("poisson", "fanout")
FILL_ROUNDS = 3  # rounds of filling in (module docstring, step 5)

Progress = Callable[[str], None]


@dataclass(frozen=True, slots=True)
class SweepConfig:
    """How one profile is measured (module docstring)."""

    mode: str = "poisson"
    fanout: int = 1  # calls per group in fan-out mode (p_m)
    warmup_s: float = 1.5
    window_s: float = 4.0
    min_groups: int = 6  # arrivals (groups) a window should expect; longer windows up to 3x
    rate_steps: tuple[float, ...] = RATE_STEPS
    probe_calls: int = 32
    idle_calls: int = 3
    keep_up: float = 0.85  # saturated when completions < keep_up x arrivals in the window
    min_behind: int = 3  # ... and at least this many calls behind (Poisson noise)
    confirm: int = 2  # saturated rates in a row that end the sweep (one may be a hiccup)
    latency_bound: float = 20.0  # ... or when mean latency > this x idle latency
    budget_s: float = 170.0  # per profile, from the engine being ready
    call_timeout_s: float = 60.0
    drain_s: float = 10.0  # how long measured calls may run past the window
    start_timeout_s: float = 300.0
    max_model_len: int = 256  # context of engines this backend starts on CPU
    sub_windows: int = 3  # parts of the window whose mean latencies give the median (RatePoint)
    recheck: bool = True  # measure a rate that looks saturated once more (the second counts)
    min_points: int = 3  # profile points a saturated sweep fills in up to (0: no filling in)

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise InvalidInputError(f"mode: must be one of {', '.join(MODES)}, got {self.mode!r}")
        if self.fanout < 1:
            raise InvalidInputError(f"fanout: must be >= 1, got {self.fanout}")
        if self.mode == "poisson" and self.fanout != 1:
            raise InvalidInputError(f"fanout: {self.fanout} needs mode 'fanout'")
        for name in ("warmup_s", "window_s", "budget_s", "call_timeout_s"):
            if not getattr(self, name) > 0:
                raise InvalidInputError(f"{name}: must be > 0, got {getattr(self, name)}")
        steps = list(self.rate_steps)
        if not steps or steps[0] <= 0 or any(b <= a for a, b in pairwise(steps)):
            raise InvalidInputError(f"rate_steps: must be > 0 and rising, got {steps}")
        if self.confirm < 1:
            raise InvalidInputError(f"confirm: must be >= 1, got {self.confirm}")
        if self.sub_windows < 1:
            raise InvalidInputError(f"sub_windows: must be >= 1, got {self.sub_windows}")
        if self.probe_calls < 2:
            raise InvalidInputError(f"probe_calls: must be >= 2, got {self.probe_calls}")
        if self.min_points < 0:
            raise InvalidInputError(f"min_points: must be >= 0, got {self.min_points}")


@dataclass(frozen=True, slots=True)
class RatePoint:
    """What one offered rate gave (latencies in s; NaN when no call succeeded)."""

    rate: float  # calls/s offered
    calls: int  # calls arriving in the steady window
    ok: int
    errors: int
    mean_latency: float
    p50_latency: float
    p99_latency: float
    ttft: float
    tpot: float
    throughput: float  # calls/s completed inside the window
    error_kinds: dict[str, int] = field(default_factory=dict)
    saturated: bool = False
    window_s: float = 0.0  # length of the measured window
    # mean latency of the calls arriving in each of ``SweepConfig.sub_windows`` equal parts of
    # the window, and their median: one slow stretch of a shared host moves the mean of the
    # window but not the median of its parts (calibration fits this one)
    window_means: tuple[float, ...] = ()
    median_window_latency: float = math.nan


@dataclass(frozen=True, slots=True)
class Measurement:
    """A sweep's result: every rate tried, the saturation rate, and how it was measured."""

    key: ProfileKey
    points: tuple[RatePoint, ...]
    saturation_rate: float
    idle_latency: float
    stop_reason: str  # "saturated", "budget" or "rates" (every step tried)
    method: dict[str, Any]

    def profile_points(self) -> tuple[RatePoint, ...]:
        """The points that go into the profile (``usable_points``)."""
        return usable_points(self.points, self.saturation_rate)

    def profile(self) -> Profile:
        kept = self.profile_points()
        if not kept:
            raise UnavailableError(
                f"profile {self.key.redis_field()}: no rate below saturation had a successful "
                f"call (errors: {self.error_kinds() or 'none'})"
            )
        points = tuple(
            ProfilePoint(p.rate, p.mean_latency, p.p50_latency, p.p99_latency, p.ttft, p.tpot)
            for p in kept
        )
        group = float(self.method.get("fanout", 1)) if self.method.get("mode") == "fanout" else 1.0
        return Profile(self.key, points, self.saturation_rate, group=group)

    def stored_points(self) -> list[tuple[float, int, int]]:
        """(throughput, calls, errors) of each profile point, for ``put_measured_profile``."""
        return [(p.throughput, p.calls, p.errors) for p in self.profile_points()]

    def error_kinds(self) -> dict[str, int]:
        total: Counter[str] = Counter()
        for p in self.points:
            total.update(p.error_kinds)
        return dict(total)

    def to_dict(self) -> dict[str, Any]:
        return {
            "key": asdict(self.key),
            "points": [_finite(asdict(p)) for p in self.points],
            "saturation_rate": self.saturation_rate,
            "idle_latency": self.idle_latency,
            "stop_reason": self.stop_reason,
            "method": self.method,
        }


def usable_points(points: Sequence[RatePoint], saturation: float) -> tuple[RatePoint, ...]:
    """The points a profile is made of: below ``saturation``, with a successful call, not behind
    (a window that fell behind below the saturation rate was a stall)."""
    return tuple(p for p in points if p.ok > 0 and p.rate < saturation and not p.saturated)


def fill_rates(saturation: float, usable: Sequence[float], wanted: int) -> tuple[float, ...]:
    """The rates a saturated sweep fills in (module docstring, step 5), rising: enough for
    ``wanted`` profile points below ``saturation`` (in a later round, the lowest filled-in rate
    that fell behind), the ``usable`` rates (those of the points it has) included.

    The candidates are the fractions k / (wanted + 1) of ``saturation``, k = 1..wanted, less
    those closer than half a step to a usable rate (a point there would add little). A usable
    rate is closer than that to one candidate at most, so enough are always left; when more are
    left than needed, the one farthest from the rates already taken (0, ``saturation`` and the
    usable ones) is taken first, the lower on a tie."""
    below = [r for r in usable if 0 < r < saturation]
    need = wanted - len(below)
    if need <= 0 or not saturation > 0:
        return ()
    step = saturation / (wanted + 1)
    candidates = [
        k * step for k in range(1, wanted + 1) if all(abs(k * step - r) >= step / 2 for r in below)
    ]
    taken = [0.0, saturation, *below]
    chosen: list[float] = []
    while candidates and len(chosen) < need:
        best = max(candidates, key=lambda c: (min(abs(c - t) for t in taken), -c))
        candidates.remove(best)
        taken.append(best)
        chosen.append(best)
    return tuple(sorted(chosen))


def _finite(values: dict[str, Any]) -> dict[str, Any]:
    return {
        k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in values.items()
    }


# ------------------------------------------------------------------------------- engines
def installed_version() -> str | None:
    """The vLLM version of the engine venv, read from its package metadata (no import)."""
    for dist in sorted(engine_venv().glob("lib/python*/site-packages/vllm-*.dist-info")):
        return public_version(dist.name[len("vllm-") : -len(".dist-info")])
    return None


def public_version(version: str) -> str:
    """``0.32.0+cpu`` -> ``0.32.0``: the engine's ``/version`` answers without the local part
    (the key's GPU type already tells a CPU build from a CUDA one)."""
    return version.split("+", 1)[0]


def model_dirs(env: Mapping[str, str] | None = None) -> dict[str, str]:
    """``$SCEPSY_MODEL_DIRS`` as ``{catalogue name: path or Hub id}``."""
    raw = (env if env is not None else os.environ).get(MODEL_DIRS_ENV, "")
    found: dict[str, str] = {}
    for item in filter(None, (part.strip() for part in raw.split(","))):
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise InvalidInputError(f"{MODEL_DIRS_ENV}: entries are name=path, got {item!r}")
        found[name.strip()] = path.strip()
    return found


FRACTION_UNITS = 100  # a profiled share is expressed in hundredths of a device


def engine_spec(
    model: ModelSpec,
    gpu: GpuSpec,
    tp: int,
    fraction: float,
    path: str,
    served_name: str,
    max_model_len: int,
    cpu_devices: int = 1,
) -> EngineSpec:
    """The engine of one profiled configuration, by the agent's launch rules
    (``services.runtime.launch.engine_spec``) for an instance placed alone on this host's first
    ``tp`` devices: on GPUs ``CUDA_VISIBLE_DEVICES``, TP, the memory cap and, for a share, an MPS
    thread percentage (the node's MPS daemon must run, as the agent runs it); on the CPU device
    a share binds the engine to that share of the host's cores. The CPU engine has no TP here
    (``InfeasibleError``, so that a planner skips those configurations).

    ``cpu_devices``: the ``cpu`` devices this host declares (a node of the cluster file): one
    device is that slice of the host's cores, as the agent binds a plan's engine (with 2 cores
    and 2 devices a whole device is one core). A profile of the ``cpu`` device must be measured
    on the cores a plan's engine gets: an engine measured on every core serves faster than one
    bound to its slice."""
    device = device_of(gpu.name)
    if device == "cpu" and tp != 1:
        raise InfeasibleError(
            f"model {model.name} on cpu: the CPU engine is measured at tp 1 only, got tp {tp}"
        )
    units = max(1, round(fraction * FRACTION_UNITS))
    assignment = Assignment(
        model=model.name,
        replica=0,
        node="profiler",
        gpus=tuple(range(tp)),
        units=units,
        mps_percentage=max(1, round(100 * fraction)),
        memory_fraction=round(0.9 * fraction, 4),
    )
    serving = ModelServing(
        model.name, path, served_name, max_model_len if device == "cpu" else None
    )
    intent = EngineIntent("profile", serving, assignment, FRACTION_UNITS, gpu.name)
    if cpu_devices < 1:
        raise InvalidInputError(f"cpu_devices: must be >= 1, got {cpu_devices}")
    cpus = tuple(sorted(os.sched_getaffinity(0))) if device == "cpu" else (0,)
    devices = max(tp, cpu_devices) if device == "cpu" else tp
    return launch_spec(intent, LaunchHost(device=device, cpus=cpus, devices=devices), port=0)


# ------------------------------------------------------------------------------- the sweep
async def engine_version(session: aiohttp.ClientSession, base_url: str, timeout_s: float) -> str:
    try:
        async with asyncio.timeout(timeout_s):
            async with session.get(f"{base_url}/version") as reply:
                if reply.status == 200:
                    return str((await reply.json())["version"])
    except (TimeoutError, aiohttp.ClientError, OSError, ValueError, KeyError):
        pass
    return "unknown"


async def served_model(session: aiohttp.ClientSession, base_url: str, timeout_s: float) -> str:
    """The first model the engine serves (``GET /v1/models``)."""
    try:
        async with asyncio.timeout(timeout_s):
            async with session.get(f"{base_url}/v1/models") as reply:
                data = await reply.json()
        return str(data["data"][0]["id"])
    except (TimeoutError, aiohttp.ClientError, OSError, ValueError, KeyError, IndexError):
        raise UnavailableError(f"endpoint {base_url}: no model listed at /v1/models") from None


def _point(
    rate: float,
    measured: list[CallOutcome],
    finished: list[CallOutcome],
    window: tuple[float, float],
    sub_windows: int = 1,
) -> RatePoint:
    """``measured``: the calls that arrived in the window; ``finished``: every call that ended
    (for the completions inside the window); ``sub_windows``: parts of the window for
    ``RatePoint.window_means``."""
    lo, hi = window
    ok = [c for c in measured if c.ok]
    parts: list[list[float]] = [[] for _ in range(sub_windows)]
    for c in ok:
        i = int((c.start - lo) / (hi - lo) * sub_windows)
        parts[min(max(i, 0), sub_windows - 1)].append(c.latency)
    means = tuple(float(np.mean(part)) for part in parts if part)
    kinds = Counter(c.error.split(":")[0] for c in measured if not c.ok)
    latency = np.asarray([c.latency for c in ok], dtype=float)
    ttft = [c.ttft for c in ok if c.ttft is not None]
    tpot = [t for c in ok if (t := c.tpot) is not None]
    done = sum(1 for c in finished if c.ok and lo <= c.end < hi)
    nan = math.nan
    return RatePoint(
        rate=rate,
        window_s=hi - lo,
        calls=len(measured),
        ok=len(ok),
        errors=len(measured) - len(ok),
        mean_latency=float(latency.mean()) if latency.size else nan,
        p50_latency=float(np.percentile(latency, 50)) if latency.size else nan,
        p99_latency=float(np.percentile(latency, 99)) if latency.size else nan,
        ttft=float(np.mean(ttft)) if ttft else nan,
        tpot=float(np.mean(tpot)) if tpot else 0.0,
        throughput=done / (hi - lo),
        error_kinds=dict(kinds),
        window_means=means,
        median_window_latency=float(np.median(means)) if means else nan,
    )


class Sweep:
    """One profile's measurement against the engine at ``base_url`` (module docstring)."""

    def __init__(
        self,
        base_url: str,
        served_name: str,
        mix: RequestMix,
        config: SweepConfig,
        seed: int = 0,
        progress: Progress | None = None,
        fallback_version: str = "unknown",
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.fallback_version = fallback_version
        self.served_name = served_name
        self.mix = mix
        self.config = config
        self._rng = np.random.default_rng([seed, 7])
        self._progress = progress or (lambda _: None)

    def _draw(self) -> tuple[int, int]:
        prompt, completion = self.mix.draw(1, self._rng)
        return int(prompt[0]), int(completion[0])

    async def _call(self, session: aiohttp.ClientSession) -> CallOutcome:
        prompt, completion = self._draw()
        return await send_completion(
            session,
            self.base_url,
            self.served_name,
            prompt,
            completion,
            np.random.default_rng(),
            timeout_s=self.config.call_timeout_s,
            clock=time.monotonic,
        )

    async def _burst(self, session: aiohttp.ClientSession, n: int) -> list[CallOutcome]:
        return list(await asyncio.gather(*(self._call(session) for _ in range(n))))

    def _window(self, rate: float) -> float:
        """The measured window at ``rate``. Low rates (and fan-out groups) get a longer one, up
        to 3x, so that it holds a few arrivals (groups): a window with one or none says nothing
        about keeping up."""
        cfg = self.config
        group = cfg.fanout if cfg.mode == "fanout" else 1
        return min(max(cfg.window_s, cfg.min_groups * group / rate), 3 * cfg.window_s)

    async def _rate(self, session: aiohttp.ClientSession, rate: float) -> RatePoint:
        cfg = self.config
        group = cfg.fanout if cfg.mode == "fanout" else 1
        span = cfg.warmup_s + self._window(rate)
        t0 = time.monotonic()
        offsets: list[float] = []
        t = float(self._rng.exponential(group / rate))
        while t < span:
            offsets.append(t)
            t += float(self._rng.exponential(group / rate))
        tasks: list[asyncio.Task[CallOutcome]] = []
        for offset in offsets:
            delay = t0 + offset - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.extend(asyncio.create_task(self._call(session)) for _ in range(group))
        window = (t0 + cfg.warmup_s, t0 + span)
        # Wait for the calls that arrived in the window, at most ``drain_s`` past it: an engine
        # that cannot keep up would otherwise hold the sweep for a call deadline. A call still
        # running then is an error ("unfinished"); the warm-up calls only loaded the engine.
        measured = [
            (task, offset)
            for task, offset in zip(tasks, _repeat(offsets, group), strict=True)
            if offset >= cfg.warmup_s
        ]
        if measured:
            remaining = t0 + span + cfg.drain_s - time.monotonic()
            await asyncio.wait([task for task, _ in measured], timeout=max(remaining, 0.1))
        now = time.monotonic()
        outcomes = [
            task.result()
            if task.done()
            else CallOutcome(t0 + offset, now, None, 0, 0, "unfinished: still running")
            for task, offset in measured
        ]
        finished = [task.result() for task in tasks if task.done()]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        return _point(rate, outcomes, finished, window, cfg.sub_windows)

    async def run(self, key_of: Callable[[str], ProfileKey]) -> Measurement:
        cfg = self.config
        started = time.monotonic()
        async with direct_session() as session:
            version = await engine_version(session, self.base_url, 10.0)
            if version == "unknown":  # a router in front: the installed engine's version
                version = self.fallback_version
            key = key_of(f"{ENGINE_PREFIX}-{public_version(version)}")
            self._progress(f"{key.redis_field()}: warm-up")
            await self._burst(session, 4)
            idle: list[CallOutcome] = []
            for _ in range(cfg.idle_calls):
                idle.append(await self._call(session))
            idle_ok = [c.latency for c in idle if c.ok]
            if not idle_ok:
                kinds = Counter(c.error for c in idle)
                raise UnavailableError(
                    f"engine {self.base_url}: every idle call failed ({dict(kinds)})"
                )
            idle_latency = float(np.mean(idle_ok))
            probe = await self._burst(session, cfg.probe_calls)
            probe_ok = [c for c in probe if c.ok]
            if len(probe_ok) >= 2:
                span = max(c.end for c in probe_ok) - min(c.start for c in probe)
                capacity = len(probe_ok) / span
            else:
                capacity = 1.0 / idle_latency
            self._progress(
                f"{key.redis_field()}: idle latency {idle_latency:.3f} s, "
                f"probe {capacity:.2f} calls/s"
            )
            name = key.redis_field()
            points: list[RatePoint] = []
            stop = "rates"
            behind = 0  # consecutive saturated rates
            steps = len(cfg.rate_steps)
            for i, step in enumerate(cfg.rate_steps):
                elapsed = time.monotonic() - started
                if elapsed + cfg.warmup_s + 2 * cfg.window_s + cfg.drain_s > cfg.budget_s:
                    stop = "budget"
                    break
                rate = step * capacity
                point, windows = await self._measure(
                    session, name, rate, idle_latency, started, cfg.warmup_s + 2 * cfg.window_s
                )
                points.append(point)
                self._report(name, f"rate {i + 1}/{steps} {_bar(i + 1, steps)}", point, started)
                behind = behind + windows if point.saturated else 0
                if behind >= cfg.confirm:
                    stop = "saturated"
                    break
            # Saturated: the best throughput achieved is the capacity.
            saturation = max((p.throughput for p in points), default=0.0)
            filled: list[RatePoint] = []
            if stop == "saturated":
                # nothing completed (the engine stalled from the first rate on): fill in below
                # the lowest rate tried
                ceiling = saturation if saturation > 0 else min(p.rate for p in points)
                filled = await self._fill(session, name, points, ceiling, idle_latency, started)
                points = sorted([*points, *filled], key=lambda p: p.rate)
                saturation = max(p.throughput for p in points)
        # Otherwise the capacity is at least the highest rate the engine kept up with (a burst's
        # rate is not sustainable).
        if stop != "saturated":
            saturation = max([saturation, *(p.rate for p in points if p.ok)])
        if not saturation > 0:
            raise UnavailableError(
                f"engine {self.base_url}: no call succeeded in the sweep "
                f"({dict(Counter(k for p in points for k in p.error_kinds))})"
            )
        method = {
            "backend": "vllm",
            "engine_version": version,
            "endpoint": self.base_url,
            "served_model": self.served_name,
            "mode": cfg.mode,
            "fanout": cfg.fanout,
            "warmup_s": cfg.warmup_s,
            "window_s": cfg.window_s,
            "sub_windows": cfg.sub_windows,
            "probe_calls": cfg.probe_calls,
            "probe_rate": capacity,
            "idle_latency_s": idle_latency,
            "rates_tried": [p.rate for p in points],
            "errors": dict(sum((Counter(p.error_kinds) for p in points), Counter())),
            "stop_reason": stop,
            "min_points": cfg.min_points,
            "filled_rates": [p.rate for p in filled],
            "mix_samples": [list(pair) for pair in self.mix.samples],
            "seconds": round(time.monotonic() - started, 2),
            "measured_at": time.time(),
        }
        return Measurement(key, tuple(points), saturation, idle_latency, stop, method)

    async def _measure(
        self,
        session: aiohttp.ClientSession,
        name: str,
        rate: float,
        idle: float,
        started: float,
        cost: float,
    ) -> tuple[RatePoint, int]:
        """One rate, marked saturated or not, and how many windows at it fell behind (a
        recheck confirms: 2). ``cost``: the seconds a window is reckoned at, for the budget."""
        cfg = self.config
        elapsed = time.monotonic() - started
        point = await self._rate(session, rate)
        is_saturated = self._saturated(point, idle)
        windows = 1
        if is_saturated and cfg.recheck and elapsed + 2 * cost + cfg.drain_s <= cfg.budget_s:
            # a shared host stalls now and then: a rate that looks saturated is measured once
            # more, and the second window counts
            self._progress(f"{name}: {rate:.2f}/s fell behind; again")
            point = await self._rate(session, rate)
            is_saturated = self._saturated(point, idle)
            windows = 2
        return replace(point, saturated=is_saturated), windows

    async def _fill(
        self,
        session: aiohttp.ClientSession,
        name: str,
        points: list[RatePoint],
        saturation: float,
        idle: float,
        started: float,
    ) -> list[RatePoint]:
        """The rates filled in below ``saturation`` (module docstring, step 5), measured while
        the next one fits the budget."""
        cfg = self.config
        filled: list[RatePoint] = []
        ceiling = saturation  # filled-in rates go below it
        for _ in range(FILL_ROUNDS):
            usable = [p.rate for p in usable_points([*points, *filled], saturation)]
            below = [r for r in usable if r < ceiling]
            rates = fill_rates(ceiling, below, cfg.min_points - (len(usable) - len(below)))
            if not rates:
                break
            self._progress(
                f"{name}: {len(usable)} point(s) below {saturation:.2f}/s; "
                f"filling in {', '.join(f'{r:.2f}' for r in rates)}/s"
            )
            for j, rate in enumerate(rates):
                cost = cfg.warmup_s + self._window(rate)
                if time.monotonic() - started + cost + cfg.drain_s > cfg.budget_s:
                    self._progress(f"{name}: no time left to fill in {rate:.2f}/s")
                    return filled
                point, _ = await self._measure(session, name, rate, idle, started, cost)
                filled.append(point)
                label = f"fill {j + 1}/{len(rates)} {_bar(j + 1, len(rates))}"
                self._report(name, label, point, started)
            # a filled-in rate that fell behind: the engine's steady capacity is below it now
            behind = [p.rate for p in filled if p.saturated and p.rate < ceiling]
            if not behind:
                break
            ceiling = min(behind)
        return filled

    def _report(self, name: str, label: str, point: RatePoint, started: float) -> None:
        self._progress(
            f"{name}: {label} offered {point.rate:.2f}/s done {point.throughput:.2f}/s "
            f"mean {point.mean_latency:.3f} s errors {point.errors} "
            f"[{time.monotonic() - started:.0f}/{self.config.budget_s:.0f} s]"
        )

    def _saturated(self, point: RatePoint, idle: float) -> bool:
        return saturated(point, idle, self.config)


def saturated(point: RatePoint, idle: float, cfg: SweepConfig) -> bool:
    """Behind the calls that really arrived in the window (a Poisson window holds more or
    fewer than rate x window), or latency past the bound (module docstring)."""
    # Calls that failed at once are answered, not queued; unfinished ones are the backlog.
    answered = point.errors - point.error_kinds.get("unfinished", 0)
    expected = point.calls - answered
    behind = expected - point.throughput * point.window_s
    if behind > max((1 - cfg.keep_up) * expected, cfg.min_behind - 0.5):
        return True
    return bool(point.ok and point.mean_latency > cfg.latency_bound * idle)


def _repeat(values: list[float], times: int) -> Iterator[float]:
    for v in values:
        for _ in range(times):
            yield v


def _bar(done: int, total: int, width: int = 10) -> str:
    filled = round(width * done / total)
    return "[" + "#" * filled + "." * (width - filled) + "]"


def stderr_progress(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------- the backend
class VllmBackend:
    """A ``ProfileBackend`` measuring real vLLM engines (module docstring).

    ``endpoint``: attach to the engine at this base URL instead of starting one (its served
    model is ``served_name``, else the first of its ``/v1/models``; the endpoint may be a
    router, which then counts in the latency). Otherwise the model's weights come from
    ``model_dir``, else ``$SCEPSY_MODEL_DIRS`` (``name=path,...``), else the catalogue name as a
    Hub id; the engine's log goes to ``log_dir``.
    """

    name = "vllm"

    def __init__(
        self,
        *,
        endpoint: str | None = None,
        model_dir: str | Path | None = None,
        config: SweepConfig | None = None,
        log_dir: Path | None = None,
        progress: Progress | None = None,
        vllm: Path | None = None,
        served_name: str | None = None,
        cpu_devices: int = 1,
    ) -> None:
        self.endpoint = endpoint.rstrip("/") if endpoint else None
        self.served_name = served_name
        self.model_dir = str(model_dir) if model_dir is not None else None
        self.config = config or SweepConfig()
        self.log_dir = log_dir
        self.progress = progress
        self.vllm = vllm
        self.cpu_devices = cpu_devices
        # The key's engine: ``vllm-<version>`` of the engine venv. A measured key names the
        # version the engine itself reports (the same, for engines started from that venv).
        self.engine = f"{ENGINE_PREFIX}-{installed_version() or 'unknown'}"

    def profile(
        self, model: ModelSpec, gpu: GpuSpec, tp: int, fraction: float, mix: RequestMix, seed: int
    ) -> Profile:
        return self.measure(model, gpu, tp, fraction, mix, seed).profile()

    def measure(
        self, model: ModelSpec, gpu: GpuSpec, tp: int, fraction: float, mix: RequestMix, seed: int
    ) -> Measurement:
        """Measure one configuration (blocking: runs its own event loop; call it from a worker
        thread in asyncio code)."""
        with self._engine(model, gpu, tp, fraction, mix) as (base_url, served):
            sweep = Sweep(
                base_url,
                served,
                mix,
                self.config,
                seed,
                self.progress,
                fallback_version=installed_version() or "unknown",
            )
            return asyncio.run(
                sweep.run(
                    lambda engine: ProfileKey(model.name, gpu.name, tp, fraction, engine, mix.id)
                )
            )

    @contextlib.contextmanager
    def _engine(
        self, model: ModelSpec, gpu: GpuSpec, tp: int, fraction: float, mix: RequestMix
    ) -> Iterator[tuple[str, str]]:
        if self.endpoint is not None:
            served = self.served_name or asyncio.run(_served(self.endpoint))
            yield self.endpoint, served
            return
        if mix.longest > self.config.max_model_len and gpu.name == CPU_GPU:
            raise InfeasibleError(
                f"model {model.name} on cpu: the mix {mix.id!r} has calls of {mix.longest} "
                f"tokens, the engine's context is {self.config.max_model_len}"
            )
        path = self.model_dir or model_dirs().get(model.name) or model.name
        served = model.name.replace("/", "--")
        spec = engine_spec(
            model,
            gpu,
            tp,
            fraction,
            path,
            served,
            self.config.max_model_len,
            self.cpu_devices,
        )
        log_dir = self.log_dir or Path(tempfile.gettempdir()) / "scepsy-profiler"
        log = log_dir / f"{served}-tp{tp}-f{fraction:g}-{os.getpid()}.log"
        if self.progress:
            self.progress(f"starting engine {served} ({path}); log {log}")
        with LocalEngine(spec, log, vllm=self.vllm) as engine:
            engine.start()
            engine.wait_ready(time.monotonic() + self.config.start_timeout_s)
            yield engine.base_url, served


async def _served(endpoint: str) -> str:
    async with direct_session() as session:
        return await served_model(session, endpoint, 10.0)
