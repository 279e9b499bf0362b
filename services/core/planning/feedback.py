"""Placement feedback: search until the optimal allocation places (``search_placed``).

The search (``services.core.planning.search``) sees the cluster as a number of GPU units; the placer
(``services.core.placement.heuristic``) sees nodes, NVLink domains and single GPUs that fractions
must
share. When the placer refuses the optimum it raises ``PlacementInfeasible`` with a kind, the
model and the numbers; ``refinements`` turns that into constraints that rule the refused
allocation out, and a best-first branch and bound over those constraints returns the best
allocation that places. A plan built from it always places.
"""

from __future__ import annotations

import contextlib
import heapq
import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace

from services.core.allocation import TP_DEGREES, Allocation
from services.core.errors import InfeasibleError
from services.core.placement.heuristic import InfeasibleKind, Placement, PlacementInfeasible
from services.core.planning.alp import BurstLookup, FitCheck, ProfileLookup
from services.core.planning.search import AllocationInfeasible, SearchResult, infeasible, search
from services.core.planning.space import Constraints, Problem

# allocation -> its placement; raises ``PlacementInfeasible`` when it does not place.
PlaceFn = Callable[[Mapping[str, Allocation]], Placement]

DEFAULT_MAX_ROUNDS = 256  # searches of the placement feedback before giving up


@dataclass(frozen=True, slots=True)
class PlacedResult:
    """A search result that places, the placement, and the constraints that led to it."""

    result: SearchResult
    placement: Placement
    constraints: Constraints
    rounds: int  # searches run (1 when the first optimum placed)
    seconds: float  # all rounds, search and placement


def search_placed(
    problem: Problem,
    profiles: ProfileLookup,
    place: PlaceFn,
    *,
    fits: FitCheck | None = None,
    constraints: Constraints | None = None,
    max_rounds: int = DEFAULT_MAX_ROUNDS,
    clock: Callable[[], float] = time.perf_counter,
    bursts: BurstLookup | None = None,
) -> PlacedResult:
    """The best allocation that places: best-first branch and bound over placement feedback.

    Search; when the placer refuses the optimum, its reason becomes constraints
    (``refinements``), each ruling the refused allocation out. Open branches wait in a queue by
    a lower bound on their objective (their parent's optimum until searched, then their own);
    the lowest is searched or, when searched, placed next. So the first allocation that places
    is optimal among the allocations every branch leaves in. The branches over configurations
    cover every allocation that holds no superset of a refused allocation's engines, so when
    placeability is monotone (fewer engines place wherever more do) that is every placeable
    allocation: the result is then the optimum among all allocations that place.

    Raises ``AllocationInfeasible`` when nothing meets the constraints or nothing places,
    ``InfeasibleError`` when ``max_rounds`` searches found nothing that places.
    """
    started = clock()
    # (lower bound on the objective, 0 when searched, order, constraints, search result)
    queue: list[tuple[float, int, int, Constraints, SearchResult | None]] = []
    seen: set[tuple[object, ...]] = set()
    refusals: list[str] = []
    searches = 0
    root = constraints or Constraints()
    first = search(
        problem, profiles, fits=fits, constraints=root, clock=clock, bursts=bursts
    )  # may raise
    heapq.heappush(queue, (first.objective, 0, 0, root, first))
    seen.add(_key(root))
    while queue:
        bound, _, order, cons, result = heapq.heappop(queue)
        if result is None:  # a branch not searched yet: its parent's objective bounds it
            if searches + 1 >= max_rounds:
                raise InfeasibleError(
                    f"no placeable allocation after {searches + 1} searches; the placer "
                    f"refused: {'; '.join(refusals[:3])}"
                )
            searches += 1
            with contextlib.suppress(AllocationInfeasible):
                found = search(
                    problem, profiles, fits=fits, constraints=cons, clock=clock, bursts=bursts
                )
                heapq.heappush(queue, (found.objective, 0, order, cons, found))
            continue
        try:
            placement = place(result.allocation)
        except PlacementInfeasible as exc:
            refusals.append(str(exc))
            for child in refinements(exc, result, problem, cons):
                if _key(child) not in seen:
                    seen.add(_key(child))
                    heapq.heappush(queue, (bound, 1, len(seen), child, None))
            continue
        return PlacedResult(result, placement, cons, searches + 1, clock() - started)
    reason = f"no allocation that meets the constraints places: {'; '.join(refusals[:3])}"
    raise infeasible(problem, profiles, fits, root, [reason])


def refinements(
    exc: PlacementInfeasible, result: SearchResult, problem: Problem, constraints: Constraints
) -> list[Constraints]:
    """Constraints that rule out ``result``'s allocation, given why the placer refused it.

    * TP above every NVLink domain: cap the TP degree at the largest domain (one branch, no
      placeable allocation is lost);
    * more units than free (the whole cluster counted): cap the units at what is free (idem);
    * otherwise (a TP group or a fraction that does not fit, too few whole GPUs): one branch per
      LLM, each allowing its configuration one replica fewer. An allocation outside every
      branch runs at least the refused engines.
    """
    k = problem.fraction_unit
    notes = (*constraints.notes, str(exc))
    if exc.kind is InfeasibleKind.TP_EXCEEDS_DOMAIN:
        cap = max((t for t in TP_DEGREES if t <= exc.available), default=1)
        return [replace(constraints, max_tp=cap, notes=notes)]
    if not exc.model and abs(exc.needed * k - result.units) < 1e-6:
        free = min(result.units - 1, math.floor(exc.available * k + 1e-9))
        return [replace(constraints, max_units=max(free, 0), notes=notes)]
    branches = []
    for model, alloc in result.allocation.items():
        config = (model, alloc.tp, round(alloc.fraction * k))
        caps = {**constraints.max_replicas, config: alloc.replicas - 1}
        branches.append(replace(constraints, max_replicas=caps, notes=notes))
    return branches


def _key(constraints: Constraints) -> tuple[object, ...]:
    caps = frozenset(constraints.max_replicas.items())
    return (constraints.max_tp, constraints.max_units, caps)
