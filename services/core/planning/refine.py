"""Refining the ALP's best candidates by simulating them (optional, time-bounded).

The closed-form ALP (``services.core.planning.alp``) ranks every allocation in microseconds but
misjudges workflows whose fan-outs and per-round barriers couple the LLMs (beam search with a
reward model, map-reduce, ReAct). A simulation of an allocation serving the traced requests is
truthful for those, and fast enough for a handful of candidates. ``refine``:

1. takes the closed form's best ``candidates`` allocations (``search.ranked``: the optimum, the
   exact second best, the best of the optimum's neighbourhood), plus the closed-form optimum for
   the target rates scaled by each ``headroom`` factor (plans with more capacity, for when the
   closed form over-states throughput);
2. scores each with ``score`` (a short simulation at the target rates with a fixed seed, so all
   candidates serve the same requests), within ``seconds`` of wall time (at least the first
   ``minimum`` candidates are scored);
3. keeps the lowest simulated latency among the candidates that kept up (steady backlog); the
   closed-form optimum stays unless another candidate is faster by more than ``margin`` (a short
   simulation is noisy, the closed form is not). When none kept up, the lowest simulated
   latency.

The planner's exactness statements are about the closed form (``search``); this step only picks
among its near-optimal answers, and the caller says whether to run it (``PlanInputs.refiner``).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace

from services.core.allocation import Allocation
from services.core.errors import InfeasibleError, InvalidInputError
from services.core.planning.alp import BurstLookup, FitCheck, ProfileLookup, predict
from services.core.planning.search import ranked, search, weighted_latency
from services.core.planning.space import Constraints, Problem


@dataclass(frozen=True, slots=True)
class Scored:
    """A simulated allocation: its weighted mean request latency (s), its throughput
    (requests/s, summed over workflows) and whether it kept up with the target rates."""

    latency: float
    throughput: float
    steady: bool


# allocation -> its simulated score at the problem's target rates
Score = Callable[[Mapping[str, Allocation]], Scored]


@dataclass(frozen=True, slots=True)
class Refiner:
    """How to refine (module docstring)."""

    score: Score
    candidates: int = 4
    headroom: tuple[float, ...] = (1.15, 1.3)
    seconds: float = 30.0
    minimum: int = 2
    margin: float = 0.01
    clock: Callable[[], float] = field(default=time.perf_counter)

    def __post_init__(self) -> None:
        if self.candidates < 1 or self.minimum < 1:
            raise InvalidInputError(
                f"refiner: candidates and minimum must be >= 1, got {self.candidates}, "
                f"{self.minimum}"
            )
        if not self.seconds > 0 or not 0 <= self.margin < 1:
            raise InvalidInputError(
                f"refiner: need seconds > 0 and 0 <= margin < 1, got {self.seconds}, {self.margin}"
            )


@dataclass(frozen=True, slots=True)
class Trial:
    allocation: dict[str, Allocation]
    objective: float  # the closed form's weighted latency at the target rates
    origin: str  # "rank 1", "rank 2", ..., "headroom 1.15"
    scored: Scored | None  # None: not scored (out of time)


@dataclass(frozen=True, slots=True)
class Refined:
    chosen: Trial
    trials: tuple[Trial, ...]
    seconds: float
    margin: float = 0.01

    @property
    def order(self) -> list[Trial]:
        """The scored trials, best first (the selection rule of the module docstring)."""
        key = _rank(self.trials, self.margin)
        return sorted((t for t in self.trials if t.scored is not None), key=key)


def candidates(
    problem: Problem,
    profiles: ProfileLookup,
    refiner: Refiner,
    *,
    fits: FitCheck | None = None,
    constraints: Constraints | None = None,
    bursts: BurstLookup | None = None,
    extra: Sequence[tuple[str, dict[str, Allocation]]] = (),
) -> list[Trial]:
    """The distinct allocations to score (step 1), unscored, the closed-form optimum first and
    ``extra`` (origin, allocation) right after it (their closed-form objective inf where the
    closed form says they cannot serve)."""
    trials: list[Trial] = []
    seen: list[dict[str, Allocation]] = []
    for i, (objective, allocation) in enumerate(
        ranked(
            problem,
            profiles,
            refiner.candidates,
            fits=fits,
            constraints=constraints,
            bursts=bursts,
        )
    ):
        seen.append(allocation)
        trials.append(Trial(allocation, objective, f"rank {i + 1}", None))
    added: list[Trial] = []
    for origin, allocation in extra:
        if allocation in seen:
            continue
        seen.append(allocation)
        try:
            objective = _objective(problem, profiles, allocation, bursts, fits, problem.rho)
        except (InfeasibleError, InvalidInputError):
            objective = math.inf
        added.append(Trial(allocation, objective, origin, None))
    trials[1:1] = added
    for factor in refiner.headroom:
        scaled = replace(problem, rates={w: r * factor for w, r in problem.rates.items()})
        try:
            found = search(scaled, profiles, fits=fits, constraints=constraints, bursts=bursts)
        except InfeasibleError:
            continue
        if found.allocation in seen:
            continue
        seen.append(found.allocation)
        objective = _objective(problem, profiles, found.allocation, bursts, fits)
        trials.append(Trial(found.allocation, objective, f"headroom {factor:g}", None))
    return trials


def _objective(
    problem: Problem,
    profiles: ProfileLookup,
    allocation: Mapping[str, Allocation],
    bursts: BurstLookup | None,
    fits: FitCheck | None,
    rho: float = 1.0,
) -> float:
    prediction = predict(
        problem.workflows, profiles, allocation, problem.rates, fits=fits, bursts=bursts, rho=rho
    )
    return weighted_latency(problem, prediction)


def score_trials(trials: Sequence[Trial], refiner: Refiner) -> Refined:
    """Score the trials in order within the time budget and pick one (steps 2-3)."""
    started = refiner.clock()
    done: list[Trial] = []
    for i, t in enumerate(trials):
        if i >= refiner.minimum and refiner.clock() - started > refiner.seconds:
            done.append(t)
            continue
        done.append(replace(t, scored=refiner.score(t.allocation)))
    scored = [t for t in done if t.scored is not None]
    best = min(scored, key=_rank(done, refiner.margin))
    return Refined(best, tuple(done), refiner.clock() - started, refiner.margin)


def _rank(trials: Sequence[Trial], margin: float) -> Callable[[Trial], tuple[int, float]]:
    """Sort key: steady before not; then simulated latency, the first (the closed-form
    optimum) counted ``margin`` faster than it measured when it is steady."""
    first = trials[0] if trials else None

    def key(t: Trial) -> tuple[int, float]:
        s = t.scored
        if s is None:
            return (2, math.inf)
        latency = s.latency
        if t is first and s.steady:
            latency /= 1 + margin
        return (0 if s.steady else 1, latency)

    return key


def refine(
    problem: Problem,
    profiles: ProfileLookup,
    refiner: Refiner,
    *,
    fits: FitCheck | None = None,
    constraints: Constraints | None = None,
    bursts: BurstLookup | None = None,
    extra: Sequence[tuple[str, dict[str, Allocation]]] = (),
) -> Refined:
    """Steps 1-3 of the module docstring; the ``extra`` allocations (``candidates``) are
    always scored, whatever the time budget."""
    trials = candidates(
        problem, profiles, refiner, fits=fits, constraints=constraints, bursts=bursts, extra=extra
    )
    names = {origin for origin, _ in extra}
    scored_first = 1 + sum(t.origin in names for t in trials)
    return score_trials(trials, replace(refiner, minimum=max(refiner.minimum, scored_first)))
