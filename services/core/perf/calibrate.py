"""Calibration: fit a device's performance parameters to measured latency-vs-rate profiles.

``services.core.perf.fit`` fits the GPUs' efficiencies to a public data set of static batches.
A device with no such data (the ``cpu`` device of the test engines, a new GPU type) is calibrated
from profiles measured on it by the ``vllm`` profiler backend instead:

- every measured point (model, configuration, request mix, offered rate, mean latency) is
  predicted by running Poisson arrivals of that mix at that rate through the analytic engine
  simulator (``batching.simulate``) with candidate parameters; the saturation rate of each
  profile is predicted as the analytic backend computes it (``analytic.saturation_rate``);
- the fit minimises the mean absolute log error (robust to the odd slow window of a shared
  host, which a squared error lets dominate) of the latencies of the fit points and of each
  profile's saturation rate, by Nelder-Mead (``fit.nelder_mead``) on log-scaled
  coordinates inside ``fit.BOUNDS``, over the parameters that matter at TP 1 (``CALIBRATED``);
  the others keep their starting values;
- the points are split by rate: within each profile, points alternate between the fit set and
  the held-out set (the lowest and the highest rate are fitted), so the error after the fit is
  measured on rates the fit never saw, each between two rates it did.

Everything is deterministic: simulated arrivals are seeded per point.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from services.core.cluster.hardware import GpuSpec, gpu_spec
from services.core.cluster.models import ModelSpec, resolve_model
from services.core.errors import InfeasibleError, InvalidInputError
from services.core.perf.analytic import RequestMix, saturation_rate
from services.core.perf.batching import SchedulerConfig, simulate
from services.core.perf.fit import BOUNDS, nelder_mead
from services.core.perf.model import FloatArray, PerfModel, PerfParams

# The parameters a TP-1 profile constrains: CPU-side overheads (per iteration, per sequence, per
# call) and the achievable compute and bandwidth. Attention and all-reduce terms keep their
# starting values.
# In the order they are freed (``run_calibration`` fits no more parameters than it has fit
# terms less one): a tiny or small model on a CPU is dominated by the overheads.
CALIBRATED: tuple[str, ...] = (
    "step_overhead_s",
    "frontend_seq_s",
    "seq_overhead_s",
    "call_overhead_s",
    "compute_eff",
    "bandwidth_eff",
)
REQUESTS_PER_POINT = 200
WARMUP_SHARE = 0.1


@dataclass(frozen=True, slots=True)
class MeasuredProfile:
    """One measured profile: its configuration, request mix, points and saturation rate."""

    model: ModelSpec
    gpu: GpuSpec
    tp: int
    fraction: float
    mix: RequestMix
    rates: tuple[float, ...]
    latencies: tuple[float, ...]  # mean s per call at each rate
    saturation_rate: float

    def __post_init__(self) -> None:
        if len(self.rates) != len(self.latencies) or not self.rates:
            raise InvalidInputError(
                f"measured profile of {self.model.name}: rates and latencies must be non-empty "
                "and of equal length"
            )

    @property
    def label(self) -> str:
        return f"{self.model.name} tp{self.tp} f{self.fraction:g} {self.mix.id}"

    @classmethod
    def from_measurement(
        cls, doc: Mapping[str, Any], source: str = "measurement"
    ) -> MeasuredProfile:
        """From a measurement document (``Measurement.to_dict`` of the vllm backend): its
        profile points (below saturation, with successful calls, not behind) and its mix
        samples."""
        try:
            key = doc["key"]
            method = doc["method"]
            samples = [(int(p), int(c)) for p, c in method["mix_samples"]]
            saturation = float(doc["saturation_rate"])
            points = [
                p
                for p in doc["points"]
                if p.get("ok", 0) > 0
                and p.get("mean_latency") is not None
                and float(p["rate"]) < saturation
                and not p.get("saturated", False)
            ]
            return cls(
                model=resolve_model(key["model"]),
                gpu=gpu_spec(key["gpu_type"]),
                tp=int(key["tp"]),
                fraction=float(key["fraction"]),
                mix=RequestMix.from_samples(samples, id=key["mix"]),
                rates=tuple(float(p["rate"]) for p in points),
                latencies=tuple(_latency(p) for p in points),
                saturation_rate=saturation,
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise InvalidInputError(f"{source}: not a measurement document ({exc})") from None


def _latency(point: Mapping[str, Any]) -> float:
    """A measured point's latency: the median of its sub-window means when the sweep recorded
    them (robust to one slow stretch of a shared host), else its mean."""
    robust = point.get("median_window_latency")
    if robust is not None and math.isfinite(float(robust)):
        return float(robust)
    return float(point["mean_latency"])


@dataclass(frozen=True, slots=True)
class Point:
    """One measured point, for fitting or for scoring."""

    profile: MeasuredProfile
    rate: float
    latency: float


def split(profiles: Sequence[MeasuredProfile]) -> tuple[list[Point], list[Point]]:
    """(fit points, held-out points): within each profile, rates alternate, the lowest and the
    highest fitted, so that every held-out rate lies between fitted ones (interpolated, never
    extrapolated past the highest fitted rate, where latency turns up most steeply)."""
    fit: list[Point] = []
    held: list[Point] = []
    for prof in profiles:
        order = sorted(zip(prof.rates, prof.latencies, strict=True))
        last = len(order) - 1
        for i, (rate, latency) in enumerate(order):
            # an even count: the last two swap roles (the highest fitted)
            held_out = i % 2 == 1 if last % 2 == 0 or i < last - 1 else i == last - 1
            (held if held_out else fit).append(Point(prof, rate, latency))
    return fit, held


def _perf(prof: MeasuredProfile, params: PerfParams) -> PerfModel:
    return PerfModel.create(prof.model, prof.gpu, prof.tp, prof.fraction, params)


def predict_latency(
    point: Point, params: PerfParams, config: SchedulerConfig | None = None, seed: int = 0
) -> float:
    """Mean latency the analytic engine predicts for Poisson arrivals of the point's mix at its
    rate (the first ``WARMUP_SHARE`` of the calls left out, as in a measured window)."""
    cfg = config or SchedulerConfig()
    perf = _perf(point.profile, params)
    rng = np.random.default_rng([seed, int(point.rate * 1000)])
    gaps = rng.exponential(1.0 / point.rate, size=REQUESTS_PER_POINT)
    prompt, completion = point.profile.mix.draw(REQUESTS_PER_POINT, rng)
    result = simulate(perf, np.cumsum(gaps), prompt, completion, cfg)
    return float(result.latency[int(REQUESTS_PER_POINT * WARMUP_SHARE) :].mean())


def predict_saturation(
    prof: MeasuredProfile, params: PerfParams, config: SchedulerConfig | None = None
) -> float:
    return saturation_rate(_perf(prof, params), prof.mix, 0, config)


def ape(predicted: float, measured: float) -> float:
    """Absolute percentage error."""
    return abs(predicted / measured - 1.0) * 100.0


def latency_errors(
    points: Sequence[Point], params: PerfParams, config: SchedulerConfig | None = None
) -> list[float]:
    """Absolute percentage latency error of each point (inf where the model saturates)."""
    out: list[float] = []
    for p in points:
        try:
            out.append(ape(predict_latency(p, params, config), p.latency))
        except (InfeasibleError, InvalidInputError):
            out.append(math.inf)
    return out


def median(values: Sequence[float]) -> float:
    return float(np.median(values)) if values else math.nan


# ------------------------------------------------------------------------------- the fit
def _box(names: Sequence[str]) -> tuple[FloatArray, FloatArray]:
    lo = np.log([BOUNDS[n][0] for n in names])
    hi = np.log([BOUNDS[n][1] for n in names])
    return lo, hi


def _params(x: FloatArray, start: PerfParams, names: Sequence[str]) -> PerfParams:
    lo, hi = _box(names)
    values = np.exp(lo + np.clip(x, 0.0, 1.0) * (hi - lo))
    return replace(start, **{n: float(v) for n, v in zip(names, values, strict=True)})


def _unit(params: PerfParams, names: Sequence[str]) -> FloatArray:
    lo, hi = _box(names)
    # a parameter at 0 (the GPUs' call overhead) starts at its lower bound
    values = np.log([max(getattr(params, n), BOUNDS[n][0]) for n in names])
    unit: FloatArray = np.clip((values - lo) / (hi - lo), 0.0, 1.0)
    return unit


def loss(
    points: Sequence[Point],
    profiles: Sequence[MeasuredProfile],
    params: PerfParams,
    config: SchedulerConfig | None = None,
) -> float:
    """Mean absolute log error of the points' latencies and the profiles' saturation rates."""
    terms: list[float] = []
    try:
        for p in points:
            terms.append(abs(math.log(predict_latency(p, params, config) / p.latency)))
        for prof in profiles:
            terms.append(
                abs(math.log(predict_saturation(prof, params, config) / prof.saturation_rate))
            )
    except (InfeasibleError, InvalidInputError):
        return math.inf
    value = float(np.mean(terms))
    return value if math.isfinite(value) else math.inf


def _seeded(
    start: PerfParams, profiles: Sequence[MeasuredProfile], names: Sequence[str]
) -> PerfParams:
    """The start, with a frontend stage that is to be fitted but 0 (the GPUs' value: no stage)
    set from the measurements: the measured capacity in tokens per second is the frontend's
    (1 / ``frontend_seq_s``) if the frontend sets it. From 0 (its lower bound) the search would
    not find it: below a share of the engine's own step time the stage changes nothing."""
    if "frontend_seq_s" not in names or start.frontend_seq_s > 0:
        return start
    per_call = [
        prof.saturation_rate * float(np.mean([c for _, c in prof.mix.samples])) for prof in profiles
    ]
    lo, hi = BOUNDS["frontend_seq_s"]
    return replace(start, frontend_seq_s=float(np.clip(1.0 / max(per_call), lo, hi)))


def calibrate(
    points: Sequence[Point],
    start: PerfParams,
    *,
    names: Sequence[str] = CALIBRATED,
    config: SchedulerConfig | None = None,
    iterations: int = 150,
    on_round: Callable[[int, float], None] | None = None,
) -> PerfParams:
    """Parameters minimising ``loss`` over ``points`` (and their profiles' saturation rates),
    starting from ``start``; only ``names`` change. Two Nelder-Mead rounds, the second from the
    first's result with a smaller simplex."""
    if not points:
        raise InvalidInputError("calibrate: no measured points to fit")
    unknown = [n for n in names if n not in BOUNDS]
    if unknown:
        raise InvalidInputError(f"names: unknown parameters {unknown}")
    profiles = list({id(p.profile): p.profile for p in points}.values())

    def objective(x: FloatArray) -> float:
        return loss(points, profiles, _params(x, start, names), config)

    # from the start or, where it has no frontend stage, the stage the capacity suggests:
    # whichever fits better (the search only moves downhill from there)
    x = min(
        (_unit(start, names), _unit(_seeded(start, profiles, names), names)),
        key=objective,
    )
    for round_, scale in enumerate((0.15, 0.05)):
        x, value = nelder_mead(objective, x, scale, iterations)
        x = np.clip(x, 0.0, 1.0)
        if on_round is not None:
            on_round(round_, value)
    return _params(x, start, names)


@dataclass(frozen=True, slots=True)
class Calibration:
    """A calibration's result: the parameters before and after, and the errors of each on the
    held-out points (absolute percentage, per point)."""

    device: str
    before: PerfParams
    after: PerfParams
    fit_points: int
    held_out: tuple[Point, ...]
    errors_before: tuple[float, ...]
    errors_after: tuple[float, ...]

    @property
    def median_before(self) -> float:
        return median(self.errors_before)

    @property
    def median_after(self) -> float:
        return median(self.errors_after)


def run_calibration(
    profiles: Sequence[MeasuredProfile],
    start: PerfParams,
    *,
    names: Sequence[str] = CALIBRATED,
    config: SchedulerConfig | None = None,
    iterations: int = 150,
) -> Calibration:
    """Split, fit on the fit points, score before and after on the held-out points."""
    if not profiles:
        raise InvalidInputError("calibrate: no measured profiles")
    devices = sorted({p.gpu.name for p in profiles})
    if len(devices) != 1:
        raise InvalidInputError(f"calibrate: profiles of one device at a time, got {devices}")
    fit, held = split(profiles)
    # no more free parameters than fit terms (points and saturation rates) less one: a short
    # sweep's 3 points and 1 saturation rate fitted 5 parameters to any values and extrapolated
    # the held-out rates worse than the starting ones
    names = tuple(names)[: max(1, len(fit) + len(profiles) - 1)]
    after = calibrate(fit, start, names=names, config=config, iterations=iterations)
    return Calibration(
        device=devices[0],
        before=start,
        after=after,
        fit_points=len(fit),
        held_out=tuple(held),
        errors_before=tuple(latency_errors(held, start, config)),
        errors_after=tuple(latency_errors(held, after, config)),
    )
