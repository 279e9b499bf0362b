"""Placement: an allocation onto nodes and GPUs (``docs/design.md``, Placement).

Units, free capacity, enforcement (MPS share, memory cap), the hard rules, fragmentation and the
infeasibility reasons are defined in ``services.core.placement.rules`` and re-exported here.

**Heuristic** (``place``), hierarchical:

1. TP groups, largest first, then whole GPUs: each on an NVLink domain with enough wholly free
   GPUs, the tightest fit (best fit); inside the domain, one NUMA node when possible.
2. Fractions: partly used GPUs first, tightest first, each filled with the subset of the pending
   fractions that uses most of its free units (a subset-sum over at most k units); then new GPUs
   (from the tightest domain), each taking the largest pending fraction plus the subset that best
   fills the rest. This packs much closer than best-fit-decreasing when GPUs start partly used.
3. Among equally good candidates a replica prefers a node that runs fewer replicas of its model
   (up to ``spread_window`` candidates are looked at): replicas spread when it costs no
   fragmentation.

A few variants of steps 1 and 2 run and the least fragmented result wins: step 1 also with
"prefer the tightest domain that the pending whole-GPU groups fill completely" (a touched domain
should end full, not broken); step 2 also with smaller fractions first among equally full fills,
and with fractions that fit no partly used GPU opening (and completing) new GPUs first.

Free space is kept in buckets by size, so a variant costs O(instances x (bucket sizes + window
log GPUs)): 1,000 nodes x 8 GPUs take well under a second (``scripts/bench_placement.py``).
``services.core.placement.milp`` computes the exact optimum of the same objective for comparison.

**Incremental** (``replace_running``): running instances whose model kept its (TP, fraction) stay
where
they are when still valid, up to the new replica count; the rest is placed around them. When that
cannot be placed, everything is placed afresh. ``reconcile`` matches the result with the running
placement: same config and location = kept (same replica id), same config elsewhere = moved (its
replica id travels along), otherwise started (lowest unused id) or stopped.
"""

from __future__ import annotations

import copy
import heapq
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import replace

from services.core.allocation import Allocation
from services.core.cluster.inventory import NodeInventory
from services.core.placement.rules import (
    DEFAULT_MEMORY_MARGIN,
    Assignment,
    ClusterState,
    Fragmentation,
    GpuSlot,
    InfeasibleKind,
    Instance,
    Placement,
    PlacementInfeasible,
    Replacement,
    Violation,
    check_instances,
    cluster_state,
    diagnose,
    enforcement,
    fragmentation,
    instances_of,
    locate,
    make_assignment,
    make_placement,
    validate,
)

__all__ = [
    "DEFAULT_MEMORY_MARGIN",
    "DEFAULT_SPREAD_WINDOW",
    "Assignment",
    "ClusterState",
    "Fragmentation",
    "GpuSlot",
    "InfeasibleKind",
    "Instance",
    "Placement",
    "PlacementInfeasible",
    "Replacement",
    "Violation",
    "cluster_state",
    "diagnose",
    "enforcement",
    "fragmentation",
    "instances_of",
    "keepers",
    "locate",
    "make_assignment",
    "make_placement",
    "place",
    "place_allocation",
    "reconcile",
    "replace_running",
    "validate",
]

DEFAULT_SPREAD_WINDOW = 8


# ------------------------------------------------------------------------------------ heuristic
def place(
    instances: Sequence[Instance],
    state: ClusterState,
    *,
    pinned: Sequence[Assignment] = (),
    spread_window: int = DEFAULT_SPREAD_WINDOW,
) -> Placement:
    """Place ``instances`` with the hierarchical heuristic (module docstring).

    ``pinned`` assignments (already running, valid on ``state``) stay as they are and are part of
    the result. Raises ``PlacementInfeasible`` with the reason, ``InvalidInputError`` for units
    outside 1..k or a fraction with tp > 1.
    """
    check_instances(instances, state.k)
    diagnose(instances, state, pinned)
    best: Placement | None = None
    error: PlacementInfeasible | None = None
    for found in _variants(instances, state, pinned, max(1, spread_window)):
        if isinstance(found, PlacementInfeasible):
            error = error or found
        elif best is None or found.fragmentation.key() < best.fragmentation.key():
            best = found
    if best is None:
        assert error is not None
        raise error
    return best


def _variants(
    instances: Sequence[Instance],
    state: ClusterState,
    pinned: Sequence[Assignment],
    window: int,
) -> Iterator[Placement | PlacementInfeasible]:
    """The hierarchy under each domain order of step 1 (tightest, or completable first) and each
    fraction policy of step 2 (``_FRACTION_POLICIES``); a failed variant yields its error."""
    ordered = sorted(instances, key=lambda i: (-i.tp, -i.units, i.model, i.replica))
    wholes = [i for i in ordered if i.units == state.k]
    fractions = [i for i in ordered if i.units < state.k]
    seen: set[tuple[int, ...]] = set()
    for complete_first in (False, True) if any(i.tp > 1 for i in wholes) else (False,):
        packer = _Packer(state, window)
        for a in pinned:
            packer.apply(a.model, a.replica, a.units, packer.positions(a))
        pending = Counter(i.tp for i in wholes)
        try:
            for inst in wholes:
                packer.place_whole(inst, pending if complete_first else None)
                pending[inst.tp] -= 1
        except PlacementInfeasible as exc:
            yield exc
            continue
        if tuple(packer.free) in seen:  # the same GPUs as an earlier order: same step 2
            continue
        seen.add(tuple(packer.free))
        partly_used = any(0 < f < state.k for f in packer.free)
        policies = [p for p in _FRACTION_POLICIES if partly_used or not p[1]] if fractions else []
        for small_first, new_first in policies or _FRACTION_POLICIES[:1]:
            trial = packer.copy()
            try:
                trial.place_fractions(fractions, small_first, new_first)
            except PlacementInfeasible as exc:
                yield exc
                continue
            yield make_placement(state, trial.placed)


# (smaller fractions first among equally full fills, fractions that fit no partly used GPU first);
# the second only differs from the first when some GPU is partly used before step 2.
_FRACTION_POLICIES = ((False, False), (True, False), (False, True))


def _completable(free: int, pending: Counter[int]) -> bool:
    """Whether some of the pending groups (sizes by count) fill ``free`` GPUs exactly. Greedy,
    largest first, is exact because TP degrees divide each other."""
    for size in sorted(pending, reverse=True):
        free -= size * min(pending[size], free // size)
    return free == 0


def _best_fill(capacity: int, sizes: Counter[int], small_first: bool) -> list[int]:
    """The sizes (a sub-multiset of ``sizes``) with the largest sum <= ``capacity``; among equal
    sums the one found first from the larger (or smaller) sizes. A subset-sum over <= k units."""
    best: list[list[int] | None] = [[]] + [None] * capacity
    for size in sorted(sizes, reverse=not small_first):
        for _ in range(min(sizes[size], capacity // size)):
            for c in range(capacity, size - 1, -1):
                base = best[c - size]
                if best[c] is None and base is not None:
                    best[c] = [*base, size]
    return next(b for b in reversed(best) if b is not None)


class _Packer:
    """Mutable working state of one ``place`` call; never escapes it.

    ``domain_heaps[c]`` holds domains with exactly c wholly free GPUs, ``gpu_heaps[f]`` partly
    used GPUs with f free units; entries go stale when the count changes (counts only fall) and
    are dropped when popped.
    """

    def __init__(self, state: ClusterState, window: int) -> None:
        self.state = state
        self.k = state.k
        self.window = window
        self.free = [g.free_units for g in state.gpus]
        self.whole = [sum(1 for p in d if self.free[p] == self.k) for d in state.domains]
        self.domain_node = [state.gpus[d[0]].node for d in state.domains]
        self.domain_heaps: list[list[int]] = [[] for _ in range(state.largest_domain + 1)]
        self.gpu_heaps: list[list[int]] = [[] for _ in range(self.k)]
        for d, c in enumerate(self.whole):
            self.domain_heaps[c].append(d)  # ascending ids: already heaps
        for p, f in enumerate(self.free):
            if 0 < f < self.k:
                self.gpu_heaps[f].append(p)
        self.on_node: Counter[tuple[str, str]] = Counter()
        self.on_gpu: Counter[tuple[str, int]] = Counter()
        self.placed: list[Assignment] = []

    def copy(self) -> _Packer:
        twin = copy.copy(self)
        twin.free, twin.whole, twin.placed = list(self.free), list(self.whole), list(self.placed)
        twin.domain_heaps = [list(h) for h in self.domain_heaps]
        twin.gpu_heaps = [list(h) for h in self.gpu_heaps]
        twin.on_node, twin.on_gpu = Counter(self.on_node), Counter(self.on_gpu)
        return twin

    def positions(self, a: Assignment) -> list[int]:
        return [self.state.position[(a.node, g)] for g in a.gpus]

    def apply(self, model: str, replica: int, units: int, positions: list[int]) -> None:
        k = self.k
        for p in positions:
            if self.free[p] == k:
                d = self.state.gpus[p].domain
                self.whole[d] -= 1
                heapq.heappush(self.domain_heaps[self.whole[d]], d)
            self.free[p] -= units
            if 0 < self.free[p] < k:
                heapq.heappush(self.gpu_heaps[self.free[p]], p)
            self.on_gpu[(model, p)] += 1
        node = self.state.gpus[positions[0]].node
        self.on_node[(model, node)] += 1
        gpus = [self.state.gpus[p].index for p in positions]
        self.placed.append(
            make_assignment(model, replica, node, gpus, units, k, self.state.memory_margin)
        )

    # ---------------------------------------------------------------- whole GPUs and TP groups
    def place_whole(self, inst: Instance, pending: Counter[int] | None) -> None:
        """One whole-GPU instance on the tightest domain, or, given ``pending`` (whole-GPU
        groups still to place, by size), on the tightest one that they can fill completely."""
        sizes = range(inst.tp, len(self.domain_heaps))
        complete = [c for c in sizes if _completable(c, pending)] if pending else []
        for c in complete + list(sizes):
            d = self._pick_domain(c, inst.model)
            if d is not None:
                self.apply(inst.model, inst.replica, inst.units, self._take(d, inst.tp))
                return
        block = max(self.whole, default=0)
        if inst.tp > 1:
            raise PlacementInfeasible(
                InfeasibleKind.TP_GROUP_DOES_NOT_FIT,
                f"{inst.model}: a TP-{inst.tp} group needs {inst.tp} wholly free GPUs in one "
                f"NVLink domain; the largest such block has {block} ({sum(self.whole)} wholly "
                "free GPUs in all)",
                model=inst.model,
                needed=inst.tp,
                available=block,
            )
        raise PlacementInfeasible(
            InfeasibleKind.NOT_ENOUGH_GPUS,
            f"{inst.model}: no wholly free GPU left for replica {inst.replica}",
            model=inst.model,
            needed=1,
            available=0,
        )

    def _pick_domain(self, c: int, model: str) -> int | None:
        return self._pick(
            self.domain_heaps[c],
            lambda d: self.whole[d] == c,
            lambda d: (self.on_node[(model, self.domain_node[d])], 0),
        )

    def _take(self, d: int, t: int) -> list[int]:
        """``t`` wholly free GPUs of domain ``d``: from the NUMA node that fits them most
        tightly, else the largest NUMA groups first."""
        gpus = self.state.gpus
        free = [p for p in self.state.domains[d] if self.free[p] == self.k]
        groups: dict[int, list[int]] = {}
        for p in free:
            groups.setdefault(gpus[p].numa, []).append(p)
        fitting = [g for g in groups.values() if len(g) >= t]
        if fitting:
            return min(fitting, key=lambda g: (len(g), g[0]))[:t]
        ranked = sorted(free, key=lambda p: (-len(groups[gpus[p].numa]), gpus[p].numa, p))
        return sorted(ranked[:t])

    # ---------------------------------------------------------------- fractions
    def place_fractions(
        self, fractions: list[Instance], small_first: bool, new_first: bool
    ) -> None:
        """Fill partly used GPUs (tightest first), then new GPUs (module docstring). With
        ``new_first``, fractions too large for every partly used GPU open theirs first."""
        pool = _Pool(fractions)
        if new_first:
            roomiest = max((f for f in self.free if 0 < f < self.k), default=0)
            self._open_new(pool, small_first, lambda: pool.largest() > roomiest)
        for f in range(1, self.k):
            heap = self.gpu_heaps[f]
            while heap and pool:
                p = heapq.heappop(heap)
                if self.free[p] == f:
                    self._fill(p, _best_fill(f, pool.sizes, small_first), pool)
        self._open_new(pool, small_first, lambda: True)

    def _open_new(self, pool: _Pool, small_first: bool, more: Callable[[], bool]) -> None:
        """New GPUs, each with the largest pending fraction and the best fill of the rest."""
        while pool and more():
            largest = pool.largest()
            model = pool.model_for(largest, lambda m: (0, 0))
            opened = self._open_gpu(model)
            if opened is None:
                raise self._no_room(pool, largest, model)
            rest = _best_fill(self.k - largest, pool.without(largest), small_first)
            self._fill(opened, [largest, *rest], pool)

    def _fill(self, p: int, sizes: list[int], pool: _Pool) -> None:
        node = self.state.gpus[p].node
        for size in sizes:
            inst = pool.take(size, lambda m: (self.on_node[(m, node)], self.on_gpu[(m, p)]))
            self.apply(inst.model, inst.replica, inst.units, [p])

    def _open_gpu(self, model: str) -> int | None:
        for c in range(1, len(self.domain_heaps)):
            d = self._pick_domain(c, model)
            if d is not None:
                return self._take(d, 1)[0]
        return None

    def _no_room(self, pool: _Pool, units: int, model: str) -> PlacementInfeasible:
        free, most, pending = sum(self.free), max(self.free, default=0), pool.units()
        return PlacementInfeasible(
            InfeasibleKind.NOT_ENOUGH_GPUS
            if pending > free
            else InfeasibleKind.FRACTIONS_DO_NOT_PACK,
            f"{model}: {units}/{self.k} of a GPU does not fit: the most free on one GPU is "
            f"{most}/{self.k}; fractions still to place need {pending} units, {free} are free",
            model=model,
            needed=units,
            available=most,
        )

    # ---------------------------------------------------------------- choosing among equals
    def _pick(
        self,
        heap: list[int],
        valid: Callable[[int], bool],
        rank: Callable[[int], tuple[int, int]],
    ) -> int | None:
        """Pop the best of the first ``window`` valid entries (lowest rank, then lowest id); the
        others go back."""
        seen: list[tuple[tuple[int, int], int]] = []
        while heap and len(seen) < self.window:
            item = heapq.heappop(heap)
            if valid(item):
                seen.append((rank(item), item))
                if seen[-1][0] == (0, 0):
                    break
        if not seen:
            return None
        best = min(seen)
        for entry in seen:
            if entry is not best:
                heapq.heappush(heap, entry[1])
        return best[1]


class _Pool:
    """Fractional instances still to place, by size and model."""

    def __init__(self, fractions: list[Instance]) -> None:
        self.by_size: dict[int, dict[str, list[Instance]]] = {}
        for inst in reversed(fractions):  # lists are popped from the end: lowest replica first
            self.by_size.setdefault(inst.units, {}).setdefault(inst.model, []).append(inst)
        self.sizes: Counter[int] = Counter(i.units for i in fractions)

    def __bool__(self) -> bool:
        return bool(+self.sizes)

    def largest(self) -> int:
        return max(s for s, n in self.sizes.items() if n > 0)

    def units(self) -> int:
        return sum(s * n for s, n in self.sizes.items())

    def without(self, size: int) -> Counter[int]:
        rest = Counter(self.sizes)
        rest[size] -= 1
        return +rest

    def model_for(self, size: int, rank: Callable[[str], tuple[int, int]]) -> str:
        models = self.by_size[size]
        return min((m for m in models if models[m]), key=lambda m: (rank(m), m))

    def take(self, size: int, rank: Callable[[str], tuple[int, int]]) -> Instance:
        """An instance of ``size`` units of the best-ranked model (spread), lowest replica."""
        model = self.model_for(size, rank)
        self.sizes[size] -= 1
        return self.by_size[size][model].pop()


# ------------------------------------------------------------------------------------ incremental
def place_allocation(
    allocation: Mapping[str, Allocation],
    k: int,
    nodes: Sequence[NodeInventory],
    *,
    current: Sequence[Assignment] = (),
    reserved: Sequence[Assignment] = (),
    memory_margin: float = DEFAULT_MEMORY_MARGIN,
    spread_window: int = DEFAULT_SPREAD_WINDOW,
) -> Replacement:
    """The placer's one call: ``allocation`` (fractions in units of 1/k) on ``nodes``, keeping
    what it can of the ``current`` placement (empty: a fresh placement, everything started).

    Raises ``InvalidInputError`` for a malformed allocation, ``PlacementInfeasible`` (also for a
    cluster without nodes) when it does not place.
    """
    instances = instances_of(allocation, k)
    if not nodes:
        raise PlacementInfeasible(
            InfeasibleKind.NOT_ENOUGH_GPUS,
            "the cluster has no nodes",
            needed=sum(i.tp * i.units for i in instances) / k,
        )
    state = cluster_state(nodes, k, reserved=reserved, current=current, memory_margin=memory_margin)
    return replace_running(instances, state, current, spread_window=spread_window)


def replace_running(
    instances: Sequence[Instance],
    state: ClusterState,
    current: Sequence[Assignment],
    *,
    spread_window: int = DEFAULT_SPREAD_WINDOW,
) -> Replacement:
    """Place ``instances`` keeping as much of the ``current`` placement running as is valid
    (module docstring). Raises ``PlacementInfeasible`` when even a fresh placement fails."""
    check_instances(instances, state.k)
    keep = keepers(instances, state, current)
    kept_count = Counter(a.model for a in keep)
    kept_ids: dict[str, set[int]] = {}
    for a in keep:
        kept_ids.setdefault(a.model, set()).add(a.replica)
    rest: list[Instance] = []
    done: Counter[str] = Counter()
    for inst in instances:
        if done[inst.model] < kept_count[inst.model]:
            done[inst.model] += 1
            continue
        rid = _lowest_free(kept_ids.setdefault(inst.model, set()))
        kept_ids[inst.model].add(rid)
        rest.append(replace(inst, replica=rid))
    pinned = [_renew(a, state) for a in keep]
    try:
        proposed = place(rest, state, pinned=pinned, spread_window=spread_window)
    except PlacementInfeasible:
        proposed = place(instances, state, spread_window=spread_window)
    return reconcile(current, proposed, state)


def keepers(
    instances: Sequence[Instance], state: ClusterState, current: Sequence[Assignment]
) -> tuple[Assignment, ...]:
    """Running assignments that may stay: same (tp, units) as the model's new instances, valid on
    ``state``, within its free capacity (larger engines first), at most the new replica count
    per model (lowest replica ids first)."""
    want: dict[str, tuple[int, int]] = {}
    count: Counter[str] = Counter()
    for inst in instances:
        want[inst.model] = (inst.tp, inst.units)
        count[inst.model] += 1
    left = [g.free_units for g in state.gpus]
    out: list[Assignment] = []
    for a in sorted(current, key=lambda a: (-a.tp, -a.units, a.model, a.replica)):
        if want.get(a.model) != (a.tp, a.units) or count[a.model] == 0:
            continue
        positions, problems = locate(_renew(a, state), state)
        if problems or len(positions) != a.tp or any(left[p] < a.units for p in positions):
            continue
        for p in positions:
            left[p] -= a.units
        count[a.model] -= 1
        out.append(a)
    return tuple(out)


def reconcile(
    current: Sequence[Assignment], proposed: Placement, state: ClusterState
) -> Replacement:
    """Match ``proposed`` with the running ``current`` placement (module docstring) and give the
    new placement stable replica ids."""
    olds: dict[tuple[str, int, int], list[Assignment]] = {}
    news: dict[tuple[str, int, int], list[Assignment]] = {}
    for a in sorted(current, key=lambda a: (a.model, a.replica)):
        olds.setdefault((a.model, a.tp, a.units), []).append(a)
    for a in proposed.assignments:
        news.setdefault((a.model, a.tp, a.units), []).append(a)
    kept: list[Assignment] = []
    moved: list[tuple[Assignment, Assignment]] = []
    fresh: list[Assignment] = []
    stopped: list[Assignment] = []
    for config in sorted(olds.keys() | news.keys()):
        k, m, f, s = _match(olds.get(config, []), news.get(config, []))
        kept += k
        moved += m
        fresh += f
        stopped += s
    used: dict[str, set[int]] = {}
    for a in current:
        used.setdefault(a.model, set()).add(a.replica)
    started = []
    for a in fresh:
        rid = _lowest_free(used.setdefault(a.model, set()))
        used[a.model].add(rid)
        started.append(replace(a, replica=rid))
    placement = make_placement(state, [*kept, *(new for _, new in moved), *started])
    return Replacement(placement, tuple(kept), tuple(started), tuple(stopped), tuple(moved))


_Matched = tuple[
    list[Assignment], list[tuple[Assignment, Assignment]], list[Assignment], list[Assignment]
]


def _match(
    olds: list[Assignment], news: list[Assignment]
) -> tuple[
    list[Assignment], list[tuple[Assignment, Assignment]], list[Assignment], list[Assignment]
]:
    """(kept, moved, unmatched new, unmatched old) for one (model, tp, units) config."""
    at: dict[tuple[str, tuple[int, ...]], list[Assignment]] = {}
    for a in olds:
        at.setdefault((a.node, a.gpus), []).append(a)
    kept: list[Assignment] = []
    others: list[Assignment] = []
    matched: set[int] = set()
    for a in news:
        here = at.get((a.node, a.gpus))
        if here:
            old = here.pop(0)
            matched.add(old.replica)
            kept.append(replace(a, replica=old.replica))
        else:
            others.append(a)
    left = [a for a in olds if a.replica not in matched]
    pairs = list(zip(left, others, strict=False))
    moved = [(old, replace(new, replica=old.replica)) for old, new in pairs]
    return kept, moved, others[len(pairs) :], left[len(pairs) :]


def _renew(a: Assignment, state: ClusterState) -> Assignment:
    """``a`` with the enforcement values of ``state``'s k and memory margin."""
    return make_assignment(
        a.model, a.replica, a.node, a.gpus, a.units, state.k, state.memory_margin
    )


def _lowest_free(used: set[int]) -> int:
    rid = 0
    while rid in used:
        rid += 1
    return rid
