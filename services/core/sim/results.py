"""The evaluation's settings and results (``services.core.sim.evaluation`` fills them in)."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

from services.core.errors import InvalidInputError
from services.core.sim import baselines
from services.core.sim.measure import MeasureConfig, Point
from services.core.sim.scoring import RefineSettings
from services.core.sim.simulator import SimOptions
from services.core.sim.systems import SYSTEMS
from services.core.workload.spec import DEFAULT_FRACTION_UNIT, DEFAULT_RHO


@dataclass(frozen=True, slots=True)
class BenchSettings:
    """What ``evaluation.run_bench`` runs (its module docstring explains each step)."""

    gpu_type: str = "H100-SXM"
    gpu_counts: tuple[int, ...] = (4, 8, 16)
    # the warm-up's cluster (None: the smallest of ``gpu_counts``); a block split by GPU count
    # into processes gives the same figures as one process when they name the same
    prepare_gpus: int | None = None
    systems: tuple[str, ...] = (
        "scepsy",
        "static",
        "independent",
        "autoscaler",
        "shares",
        "shares-frac",
        "scepsy-whole",
        "scepsy-blind",
    )
    rate_fractions: tuple[float, ...] = (0.25, 0.5, 0.7, 0.85, 1.0)
    extend_factor: float = 1.2
    max_extra_rates: int = 3
    stop_after: int = 1
    refine_steps: int = 3  # a finer grid near each system's own peak
    duration: float = 45.0  # s of arrivals per run, at least
    latency_multiple: float = 25.0  # ... and at least this many isolated request latencies
    min_requests: int = 250
    max_calls: int = 40_000  # LLM calls of a run (about), before doubling an unsettled one
    # ... and at least the requests whose mean LLM time per request is within this relative
    # standard error (``Context.spread_requests``), up to about ``spread_calls`` LLM calls; None:
    # off. Co-serving RAG with a 10% share of beam search (CV 2.3): 1,000-request runs drew
    # beam's work within +-7% and measured one allocation at 5.5-6.7 s where long runs say 5.4
    run_error: float | None = 0.05
    spread_calls: int = 160_000
    # an unsettled or ambiguous run is repeated with twice the requests, up to this often: at
    # 438 requests map-reduce's backlog growth at half its capacity spreads by 1.6% (sd, 6
    # seeds), at 876 by 0.7%, against the 2% bound
    doublings: int = 2
    warmup_requests: int = 200
    # the warm-up's size from its own spread (``systems.warmup_needed``): the mean LLM time per
    # request within this relative standard error, at most ``warmup_max`` requests; None: fixed
    warmup_error: float | None = 0.01
    warmup_max: int = 8_000
    overload: float = 1.5
    oracle_gpus: int = 4  # 0: no oracle
    oracle_load: float = 0.7
    oracle_max_candidates: int = 150
    oracle_requests: int = 40  # per candidate in the first selection round
    fraction_unit: int = DEFAULT_FRACTION_UNIT
    rho: float = DEFAULT_RHO
    seed: int = 0
    measure: MeasureConfig = field(default_factory=MeasureConfig)
    autoscaler: baselines.HpaAutoscaler = field(default_factory=baselines.HpaAutoscaler)
    options: SimOptions = field(default_factory=SimOptions)
    # Scepsy's refinement by simulation (``systems.Context.refine``); None: closed form only
    refine: RefineSettings | None = field(default_factory=RefineSettings)

    def __post_init__(self) -> None:
        unknown = sorted(set(self.systems) - set(SYSTEMS))
        if unknown or "scepsy" not in self.systems:
            raise InvalidInputError(
                f"systems: must include scepsy and come from {sorted(SYSTEMS)}, got "
                f"{list(self.systems)}"
            )
        if not self.gpu_counts or min(self.gpu_counts) < 1:
            raise InvalidInputError(f"gpu_counts: must be positive, got {list(self.gpu_counts)}")
        if self.prepare_gpus is not None and self.prepare_gpus < 1:
            raise InvalidInputError(f"prepare_gpus: must be positive, got {self.prepare_gpus}")
        if not self.rate_fractions or min(self.rate_fractions) <= 0:
            raise InvalidInputError("rate_fractions: must be positive")
        if self.run_error is not None and not self.run_error > 0:
            raise InvalidInputError(f"run_error: must be positive or None, got {self.run_error!r}")

    def warmup(self) -> dict[str, Any]:
        """The warm-up arguments of ``systems.Context.prepare``."""
        return {
            "warmup_requests": self.warmup_requests,
            "warmup_error": self.warmup_error,
            "warmup_max": self.warmup_max,
        }

    @classmethod
    def quick(cls, **changes: object) -> BenchSettings:
        """A CI-sized run: four rates, short runs, no peak bisection, no oracle, a small
        refinement by simulation."""
        base = cls(
            rate_fractions=(0.3, 0.6, 0.9, 1.2),
            max_extra_rates=1,
            refine_steps=0,
            duration=20.0,
            latency_multiple=8.0,
            min_requests=40,
            max_calls=3_000,
            doublings=0,
            warmup_requests=60,
            warmup_error=None,
            oracle_gpus=0,
            measure=MeasureConfig(min_span_latencies=4.0, max_backlog_growth=0.2),
            refine=RefineSettings(
                candidates=2, headroom=(), calls=4_000, min_requests=40, latency_multiple=15.0,
                min_seconds=20.0, capacity_calls=20_000,
            ),
        )  # fmt: skip
        return replace(base, **changes)  # type: ignore[arg-type]


@dataclass(frozen=True, slots=True)
class Curve:
    system: str
    points: tuple[Point, ...]  # by rising rate


@dataclass(frozen=True, slots=True)
class AlpCheck:
    """The ALP's prediction for a plan against the simulated value."""

    rate: float
    allocation: str
    predicted: float
    simulated: float

    @property
    def error(self) -> float:
        """(predicted - simulated) / simulated."""
        return (self.predicted - self.simulated) / self.simulated


@dataclass(frozen=True, slots=True)
class OracleResult:
    rate: float
    candidates: int  # maximal allocations of the cluster
    simulated: int  # of them simulated (their capacity covers the load)
    allocation: str
    latency: float  # mean, on the measured arrivals
    scepsy_allocation: str
    scepsy_latency: float


@dataclass(frozen=True, slots=True)
class GpuResult:
    gpus: int
    capacity: float  # the ALP's highest throughput on these GPUs, requests/s
    curves: tuple[Curve, ...]
    alp_latency: tuple[AlpCheck, ...]
    alp_throughput: AlpCheck | None
    oracle: OracleResult | None
    # the refined prediction (Scepsy's simulated candidates) against the same points
    alp_refined: tuple[AlpCheck, ...] = ()

    def curve(self, system: str) -> Curve:
        return next(c for c in self.curves if c.system == system)


@dataclass(frozen=True, slots=True)
class Stability:
    """Per-LLM time shares (mean, CV) against the CV of end-to-end latency, in one trace."""

    source: str
    requests: int
    e2e_cv: float
    shares: tuple[tuple[str, float, float], ...]  # (model, mean share, CV of share)


@dataclass(frozen=True, slots=True)
class WorkflowResult:
    workflow: str
    models: dict[str, str]
    calls_per_request: dict[str, float]  # n_m of the warm-up trace
    concurrency: dict[str, float]  # p_m of the warm-up trace
    isolated_latency: float
    gpus: tuple[GpuResult, ...]
    stability: tuple[Stability, ...]
    calls: int  # LLM calls simulated for this workflow


@dataclass(frozen=True, slots=True)
class BenchResult:
    settings: BenchSettings
    workflows: tuple[WorkflowResult, ...]

    @property
    def calls(self) -> int:
        return sum(w.calls for w in self.workflows)
