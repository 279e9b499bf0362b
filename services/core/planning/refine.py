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
   candidates serve the same requests), within a ``budget`` of ``work`` (the LLM calls the
   scorer has simulated: the same candidates are scored on any host, so the same plan comes
   out) and ``seconds`` of wall time (a cap for a host far slower than the budget assumes); at
   least the first ``minimum`` candidates are scored;
3. keeps the lowest simulated latency among the candidates that kept up (steady backlog); the
   closed-form optimum stays unless another candidate is faster by more than ``margin`` (a
   short simulation is noisy, the closed form is not), and a candidate the closed form says
   cannot serve the target rates within its utilisation bound (objective inf: an ``extra``)
   counts its score's standard error (at least ``margin``) slower: where the two models
   disagree, a short run must show more than its noise. A part of the requests that falls
   behind hides in a short run: co-serving RAG with 10% beam search on 4 GPUs at 3.26 req/s,
   ``generator 2x tp1, prm 1x tp1, reranker 1x tp1`` (closed-form throughput 3.09 req/s)
   scored 14.99 s +-4.3% against 15.15 s for the closed-form optimum, its backlog steady by
   count (beam's 10% of the requests grew; 4x and 8x longer replays: 22.6 s, 33.4 s); the
   program's long runs (8,700 requests, 3 seeds) measure 20.4-21.3 s for it and 18.6-18.9 s
   for the optimum. When none kept up, the lowest simulated latency;
4. with ``confirm`` (the simulator's: at a rate a little above the target, and at the target
   on requests and arrivals drawn independently of the scoring run's), the candidate ranked
   first must keep up there too, else the next is tried (``confirmations`` at most): an
   allocation at the edge of its capacity keeps up in a short run but its queue is still
   growing, and its latency is under-stated (RAG on 16 GPUs at 41.5 req/s: 8+8 replicas
   scored 6.4 s against 6.7 s for 7+9 in the replay's short run, where long runs of the
   program measure 8.7 s, backlog +1.6%, against 6.9 s); and one sample of requests can be a
   lucky one.

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
    (requests/s, summed over workflows), whether it kept up with the target rates, and the
    relative standard error of that latency (0: not known)."""

    latency: float
    throughput: float
    steady: bool
    error: float = 0.0


# allocation -> its simulated score at the problem's target rates
Score = Callable[[Mapping[str, Allocation]], Scored]


@dataclass(frozen=True, slots=True)
class Refiner:
    """How to refine (module docstring)."""

    score: Score
    candidates: int = 4
    headroom: tuple[float, ...] = (1.15, 1.3)
    seconds: float = 30.0
    budget: float = math.inf  # in units of ``work``
    work: Callable[[], float] | None = None  # work done so far (None: no budget but time)
    minimum: int = 2
    margin: float = 0.01
    clock: Callable[[], float] = field(default=time.perf_counter)
    confirm: Score | None = None
    confirmations: int = 3

    def __post_init__(self) -> None:
        if self.candidates < 1 or self.minimum < 1:
            raise InvalidInputError(
                f"refiner: candidates and minimum must be >= 1, got {self.candidates}, "
                f"{self.minimum}"
            )
        if self.confirmations < 0:
            raise InvalidInputError(
                f"refiner: confirmations must be >= 0, got {self.confirmations}"
            )
        if not self.seconds > 0 or not self.budget > 0 or not 0 <= self.margin < 1:
            raise InvalidInputError(
                f"refiner: need seconds > 0, budget > 0 and 0 <= margin < 1, got seconds "
                f"{self.seconds}, budget {self.budget}, margin {self.margin}"
            )


@dataclass(frozen=True, slots=True)
class Trial:
    allocation: dict[str, Allocation]
    objective: float  # the closed form's weighted latency at the target rates
    origin: str  # "rank 1", "rank 2", ..., "headroom 1.15"
    scored: Scored | None  # None: not scored (out of time)
    confirmed: bool | None = None  # kept up at the confirmation rate; None: not checked


@dataclass(frozen=True, slots=True)
class Refined:
    chosen: Trial
    trials: tuple[Trial, ...]
    seconds: float
    margin: float = 0.01
    work: float = 0.0  # the scoring's work (``Refiner.work``'s units; 0 without it)

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
    """Score the trials in order within the budgets and pick one (steps 2-4)."""
    started = refiner.clock()
    work = refiner.work or (lambda: 0.0)
    begun = work()

    def spent() -> bool:
        return refiner.clock() - started > refiner.seconds or work() - begun > refiner.budget

    done: list[Trial] = []
    for i, t in enumerate(trials):
        if i >= refiner.minimum and spent():
            done.append(t)
            continue
        done.append(replace(t, scored=refiner.score(t.allocation)))
    key = _rank(done, refiner.margin)
    best = min((t for t in done if t.scored is not None), key=key)
    if refiner.confirm is not None:
        for _ in range(refiner.confirmations):
            if best.scored is None or not best.scored.steady or best.confirmed is not None:
                break
            checked = replace(best, confirmed=refiner.confirm(best.allocation).steady)
            done[done.index(best)] = checked
            best = min((t for t in done if t.scored is not None), key=key)
            if checked.confirmed:
                break
    return Refined(best, tuple(done), refiner.clock() - started, refiner.margin, work() - begun)


def _rank(trials: Sequence[Trial], margin: float) -> Callable[[Trial], tuple[int, float]]:
    """Sort key: steady and not refuted by the confirmation before steady but refuted, before
    not steady; then simulated latency, the first (the closed-form optimum) counted ``margin``
    faster than it measured when it is steady, one the closed form says cannot serve the rates
    counted its standard error (at least ``margin``) slower."""
    first = trials[0].origin if trials else None

    def key(t: Trial) -> tuple[int, float]:
        s = t.scored
        if s is None:
            return (3, math.inf)
        latency = s.latency
        if t.origin == first and s.steady:
            latency /= 1 + margin
        elif math.isinf(t.objective) and s.steady:
            latency *= 1 + max(margin, s.error)
        if not s.steady:
            return (2, latency)
        return (1 if t.confirmed is False else 0, latency)

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
    """Steps 1-4 of the module docstring; the ``extra`` allocations (``candidates``) are
    always scored, whatever the budgets."""
    trials = candidates(
        problem, profiles, refiner, fits=fits, constraints=constraints, bursts=bursts, extra=extra
    )
    names = {origin for origin, _ in extra}
    scored_first = 1 + sum(t.origin in names for t in trials)
    return score_trials(trials, replace(refiner, minimum=max(refiner.minimum, scored_first)))
