"""Placement rules: the data types, free capacity, enforcement, hard rules and fragmentation.

``services.core.placement.heuristic`` (the heuristic) and ``services.core.placement.milp`` (the
exact MILP)
both build on these definitions; ``placement`` re-exports them.

**Units.** The allocation's fraction unit k splits every GPU into k units. An LLM with fraction
f = u/k and TP degree t runs ``replicas`` instances; each instance takes u units on each of its t
GPUs (u = k, a whole GPU, whenever t > 1). A unit is 1/k of the GPU's compute and 1/k of its memory.

**Free capacity** (``cluster_state``): per GPU, the units a placement may use,
``min(compute units, memory units)``:

* compute: k minus the units of ``reserved`` engines (running engines this placement must not
  touch) on that GPU; a MIG-enabled GPU offers nothing (MPS shares need a whole, non-MIG GPU);
* memory: ``memory_margin`` (default 5%) of every GPU is left to CUDA contexts, the driver and the
  allocator, so engines share ``1 - margin`` of it. Memory used by something else (NVML's
  ``total - free``, minus what the ``current`` placement's engines are capped at, or at least what
  ``reserved`` engines are capped at) first eats into the margin and then into that share; memory
  units are ``floor(k * share / (1 - margin))``.

GPUs are interchangeable apart from their free capacity and NVLink domain: a planner placing a
heterogeneous cluster passes the nodes of one GPU type at a time.

**Enforcement** of one instance (``Assignment``): MPS active-thread percentage
``floor(100 u / k)`` (at least 1; 100 for a whole GPU) and memory cap (vLLM
``--gpu-memory-utilization``, a fraction of the GPU's total memory) ``u / k * (1 - margin)``.
The units of a GPU's instances never exceed k, so neither compute nor memory is over-committed.

**Hard rules** (``validate`` checks any placement against them): a TP group lies inside one NVLink
domain of one node, on distinct GPUs; a fractional instance (u < k) is on exactly one GPU; per GPU
the units stay within the free compute and the memory caps within the free memory share.

**Fragmentation** (``fragmentation``), compared lexicographically by ``Fragmentation.key``:
stranded units (free units left on partly used GPUs), then the largest TP group that still fits on
wholly free GPUs of one domain (larger is better), then broken domains (domains with some but not
all GPUs wholly free), then partly used GPUs.

**Infeasibility** raises ``PlacementInfeasible`` with a machine-readable ``kind`` (and ``model``,
``needed``, ``available``), so that a planner can add the matching constraint and search again.
``diagnose`` finds the reasons no placement can overcome.
"""

from __future__ import annotations

import enum
import math
from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from services.core.allocation import TP_DEGREES, Allocation, check_fraction_unit
from services.core.cluster.inventory import GpuInfo, NodeInventory
from services.core.errors import InfeasibleError, InvalidInputError

DEFAULT_MEMORY_MARGIN = 0.05
_EPS = 1e-9


# ------------------------------------------------------------------------------------ errors
class InfeasibleKind(enum.StrEnum):
    """Why an allocation does not place; ``needed``/``available`` of the error mean, per kind:"""

    TP_EXCEEDS_DOMAIN = "tp_exceeds_domain"  # tp / largest NVLink domain of the cluster (GPUs)
    TP_GROUP_DOES_NOT_FIT = "tp_group_does_not_fit"  # tp / largest block of free GPUs in a domain
    NOT_ENOUGH_GPUS = "not_enough_gpus"  # GPUs needed / free (whole GPUs, or all units / k)
    FRACTIONS_DO_NOT_PACK = "fractions_do_not_pack"  # units of the fraction / most free on a GPU


class PlacementInfeasible(InfeasibleError):
    """Raised when an allocation cannot be placed on the cluster's free capacity.

    ``str(exc)`` starts with the kind (``"fractions_do_not_pack: ..."``). The error's fields carry
    the same facts for a caller across gRPC: ``reason`` is the kind's value, ``field`` is
    ``allocation``, ``details`` hold ``model`` (text, "" when the allocation as a whole does not
    fit), ``needed`` and ``available`` (floats); ``from_fields`` rebuilds the error from them.
    """

    def __init__(
        self,
        kind: InfeasibleKind,
        message: str,
        *,
        model: str = "",
        needed: float = 0.0,
        available: float = 0.0,
    ) -> None:
        super().__init__(
            f"{kind.value}: {message}",
            reason=kind.value,
            field="allocation",
            details={"model": model, "needed": float(needed), "available": float(available)},
        )
        self.kind = kind
        self.model = model
        self.needed = needed
        self.available = available

    @classmethod
    def from_fields(
        cls,
        message: str,
        *,
        reason: str = "",
        field: str = "",
        value: str = "",
        details: Mapping[str, str | float] | None = None,
    ) -> PlacementInfeasible:
        """Raises ``ValueError`` for an unknown kind or a number that is not one, ``KeyError``
        when ``needed`` or ``available`` is missing."""
        kind = InfeasibleKind(reason)
        facts = details or {}
        return cls(
            kind,
            message.removeprefix(f"{kind.value}: "),
            model=str(facts.get("model", "")),
            needed=float(facts["needed"]),
            available=float(facts["available"]),
        )


# ------------------------------------------------------------------------------------ types
@dataclass(frozen=True, slots=True)
class Instance:
    """One engine to place: ``units`` of 1/k on each of ``tp`` GPUs."""

    model: str
    replica: int
    tp: int
    units: int

    def __post_init__(self) -> None:
        if self.tp < 1 or self.units < 1:
            raise InvalidInputError(f"{self.model}: tp and units must be >= 1, got {self}")


@dataclass(frozen=True, slots=True)
class Assignment:
    """Where one instance runs and how its share is enforced (module docstring)."""

    model: str
    replica: int
    node: str
    gpus: tuple[int, ...]
    units: int  # per GPU, in 1/k
    mps_percentage: int
    memory_fraction: float

    @property
    def tp(self) -> int:
        return len(self.gpus)


@dataclass(frozen=True, slots=True)
class GpuSlot:
    """One GPU's free capacity for this placement. ``domain`` indexes ``ClusterState.domains``."""

    node: str
    index: int
    numa: int
    domain: int
    compute_units: int  # units of compute not reserved by other engines
    memory_share: float  # share of total memory the placement's caps may sum to
    free_units: int  # min(compute units, memory units)


@dataclass(frozen=True, slots=True)
class ClusterState:
    """The cluster as the placer sees it: GPUs (by position) and NVLink domains (positions)."""

    k: int
    memory_margin: float
    gpus: tuple[GpuSlot, ...]
    domains: tuple[tuple[int, ...], ...]
    position: Mapping[tuple[str, int], int] = field(compare=False, repr=False)
    nodes: frozenset[str] = field(compare=False, repr=False, default=frozenset())

    @property
    def largest_domain(self) -> int:
        return max((len(d) for d in self.domains), default=0)


@dataclass(frozen=True, slots=True)
class Fragmentation:
    partly_used_gpus: int  # GPUs with some but not all units used (by anyone)
    stranded_units: int  # free units on partly used GPUs
    stranded_fraction: float  # the same in GPUs
    largest_free_tp: int  # largest TP degree that fits on wholly free GPUs of one domain (0: none)
    largest_free_block: int  # most wholly free GPUs in one domain
    free_gpus: int  # wholly free GPUs
    broken_domains: int  # domains with some but not all GPUs wholly free

    def key(self) -> tuple[int, int, int, int]:
        """Lexicographic objective, smaller is better (module docstring)."""
        return (
            self.stranded_units,
            -self.largest_free_tp,
            self.broken_domains,
            self.partly_used_gpus,
        )


@dataclass(frozen=True, slots=True)
class Placement:
    k: int
    memory_margin: float
    assignments: tuple[Assignment, ...]  # sorted by (model, replica)
    fragmentation: Fragmentation


@dataclass(frozen=True, slots=True)
class Replacement:
    """A new placement and how it differs from the running one."""

    placement: Placement
    kept: tuple[Assignment, ...]
    started: tuple[Assignment, ...]
    stopped: tuple[Assignment, ...]  # from the running placement
    moved: tuple[tuple[Assignment, Assignment], ...]  # (running, new), same replica id


@dataclass(frozen=True, slots=True)
class Violation:
    rule: str  # e.g. "tp_across_domains", "compute_overcommit" (see ``validate``)
    message: str


# ------------------------------------------------------------------------------------ inputs
def instances_of(allocation: Mapping[str, Allocation], k: int) -> tuple[Instance, ...]:
    """One instance per replica (replicas 0..r-1), by model name.

    Raises ``InvalidInputError`` when k < 1 or a fraction is not a multiple of 1/k.
    """
    _check_k(k)
    out: list[Instance] = []
    for model in sorted(allocation):
        alloc = allocation[model]
        check_fraction_unit(model, alloc, k)
        units = round(alloc.fraction * k)
        out.extend(Instance(model, r, alloc.tp, units) for r in range(alloc.replicas))
    return tuple(out)


def enforcement(units: int, k: int, memory_margin: float) -> tuple[int, float]:
    """(MPS active-thread percentage, memory cap fraction) of an instance of ``units``."""
    mps = 100 if units >= k else max(1, 100 * units // k)
    return mps, round(units / k * (1 - memory_margin), 6)


def make_assignment(
    model: str, replica: int, node: str, gpus: Iterable[int], units: int, k: int, margin: float
) -> Assignment:
    mps, memory = enforcement(units, k, margin)
    return Assignment(model, replica, node, tuple(gpus), units, mps, memory)


def cluster_state(
    nodes: Sequence[NodeInventory],
    k: int,
    *,
    reserved: Sequence[Assignment] = (),
    current: Sequence[Assignment] = (),
    memory_margin: float = DEFAULT_MEMORY_MARGIN,
) -> ClusterState:
    """Free capacity of ``nodes`` (module docstring). ``reserved``: running engines that stay and
    are not part of this placement; ``current``: the running placement (its memory is free for
    us). GPUs that no NVLink domain lists form a domain of their own."""
    _check_k(k)
    if not 0 <= memory_margin < 1:
        raise InvalidInputError(f"memory_margin: must be in [0, 1), got {memory_margin}")
    names = [n.name for n in nodes]
    if len(set(names)) != len(names):
        raise InvalidInputError(f"nodes: duplicate node names in {sorted(names)}")
    res_units: Counter[tuple[str, int]] = Counter()
    res_mem: defaultdict[tuple[str, int], float] = defaultdict(float)
    cur_mem: defaultdict[tuple[str, int], float] = defaultdict(float)
    for a in reserved:
        for g in a.gpus:
            res_units[(a.node, g)] += a.units
            res_mem[(a.node, g)] += a.memory_fraction
    for a in current:
        for g in a.gpus:
            cur_mem[(a.node, g)] += a.memory_fraction
    gpus: list[GpuSlot] = []
    domains: list[tuple[int, ...]] = []
    for node in nodes:
        by_index = {g.index: g for g in node.gpus}
        listed = [tuple(i for i in sorted(d) if i in by_index) for d in node.domains]
        covered = {i for d in listed for i in d}
        node_domains = [d for d in listed if d] + [
            (i,) for i in sorted(by_index) if i not in covered
        ]
        for members in node_domains:
            domain_id = len(domains)
            start = len(gpus)
            for i in members:
                key = (node.name, i)
                compute, share, free = _capacity(
                    by_index[i], k, memory_margin, res_units[key], res_mem[key], cur_mem[key]
                )
                gpus.append(
                    GpuSlot(node.name, i, by_index[i].numa_node, domain_id, compute, share, free)
                )
            domains.append(tuple(range(start, len(gpus))))
    position = {(g.node, g.index): p for p, g in enumerate(gpus)}
    return ClusterState(k, memory_margin, tuple(gpus), tuple(domains), position, frozenset(names))


def _capacity(
    gpu: GpuInfo, k: int, margin: float, reserved_units: int, reserved_mem: float, ours: float
) -> tuple[int, float, int]:
    if gpu.mig_enabled:
        return 0, 0.0, 0
    compute = max(0, k - reserved_units)
    total = gpu.memory_total_bytes
    observed = (total - gpu.memory_free_bytes) / total - ours if total > 0 else 0.0
    foreign = max(observed, reserved_mem, 0.0)
    share = max(0.0, (1 - margin) - max(0.0, foreign - margin))
    memory_units = min(k, math.floor(k * share / (1 - margin) + _EPS))
    return compute, share, min(compute, memory_units)


def _check_k(k: int) -> None:
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise InvalidInputError(f"fraction_unit: must be a positive integer, got {k!r}")


# ------------------------------------------------------------------------------------ metrics
def fragmentation(state: ClusterState, assignments: Iterable[Assignment]) -> Fragmentation:
    """Fragmentation of the cluster once ``assignments`` run on ``state`` (module docstring).

    Assignments naming unknown GPUs are ignored here (``validate`` reports them).
    """
    k = state.k
    left = [g.free_units for g in state.gpus]
    for a in assignments:
        for g in a.gpus:
            p = state.position.get((a.node, g))
            if p is not None:
                left[p] -= a.units
    partly = [0 < f < k for f in left]
    blocks = [sum(1 for p in d if left[p] == k) for d in state.domains]
    block = max(blocks, default=0)
    stranded = sum(f for f, part in zip(left, partly, strict=True) if part)
    return Fragmentation(
        partly_used_gpus=sum(partly),
        stranded_units=stranded,
        stranded_fraction=stranded / k,
        largest_free_tp=max((t for t in TP_DEGREES if t <= block), default=0),
        largest_free_block=block,
        free_gpus=sum(blocks),
        broken_domains=sum(1 for b, d in zip(blocks, state.domains, strict=True) if 0 < b < len(d)),
    )


def make_placement(state: ClusterState, assignments: Iterable[Assignment]) -> Placement:
    ordered = tuple(sorted(assignments, key=lambda a: (a.model, a.replica)))
    return Placement(state.k, state.memory_margin, ordered, fragmentation(state, ordered))


# ------------------------------------------------------------------------------------ validation
def validate(
    placement: Placement, state: ClusterState, instances: Sequence[Instance] | None = None
) -> tuple[Violation, ...]:
    """Every hard-rule violation of ``placement`` on ``state``; empty when valid.

    Rules: ``k_mismatch``, ``duplicate_instance``, ``units_out_of_range``, ``unknown_node``,
    ``unknown_gpu``, ``duplicate_gpu``, ``tp_across_domains``, ``fraction_on_many_gpus``,
    ``enforcement`` (MPS/memory cap not the ones of its units), ``compute_overcommit``,
    ``memory_overcommit``, and with ``instances``: ``instances`` (a different set of
    (model, tp, units) engines than asked for).
    """
    out: list[Violation] = []
    if placement.k != state.k:
        out.append(Violation("k_mismatch", f"placement k {placement.k}, cluster k {state.k}"))
    seen: set[tuple[str, int]] = set()
    units: Counter[int] = Counter()
    memory: defaultdict[int, float] = defaultdict(float)
    for a in placement.assignments:
        who = f"{a.model}#{a.replica}"
        if (a.model, a.replica) in seen:
            out.append(Violation("duplicate_instance", f"{who} is placed twice"))
        seen.add((a.model, a.replica))
        positions, problems = locate(a, state)
        out.extend(problems)
        for p in positions:
            units[p] += a.units
            memory[p] += a.memory_fraction
    for p, used in units.items():
        gpu = state.gpus[p]
        where = f"{gpu.node} GPU {gpu.index}"
        if used > gpu.compute_units:
            out.append(
                Violation("compute_overcommit", f"{where}: {used} units, {gpu.compute_units} free")
            )
        if memory[p] > gpu.memory_share + 1e-6:
            out.append(
                Violation(
                    "memory_overcommit",
                    f"{where}: memory caps sum to {memory[p]:.4f}, {gpu.memory_share:.4f} free",
                )
            )
    if instances is not None:
        asked = Counter((i.model, i.tp, i.units) for i in instances)
        got = Counter((a.model, a.tp, a.units) for a in placement.assignments)
        if asked != got:
            out.append(Violation("instances", f"asked for {dict(asked)}, placed {dict(got)}"))
    return tuple(out)


def locate(a: Assignment, state: ClusterState) -> tuple[list[int], list[Violation]]:
    """The positions of ``a``'s known GPUs in ``state`` and the violations of ``a`` on its own
    (everything ``validate`` checks except capacity shared with other assignments)."""
    k = state.k
    who = f"{a.model}#{a.replica}"
    out: list[Violation] = []
    if not 1 <= a.units <= k or not a.gpus:
        out.append(
            Violation("units_out_of_range", f"{who}: {a.units} units on {a.tp} GPUs, k = {k}")
        )
    if (a.mps_percentage, a.memory_fraction) != enforcement(a.units, k, state.memory_margin):
        out.append(
            Violation(
                "enforcement",
                f"{who}: mps {a.mps_percentage}%, memory {a.memory_fraction} for {a.units}/{k}",
            )
        )
    if a.units < k and len(a.gpus) > 1:
        out.append(Violation("fraction_on_many_gpus", f"{who}: fraction on GPUs {a.gpus}"))
    if len(set(a.gpus)) != len(a.gpus):
        out.append(Violation("duplicate_gpu", f"{who}: GPUs {a.gpus}"))
    if a.node not in state.nodes:
        out.append(Violation("unknown_node", f"{who}: node {a.node!r}"))
        return [], out
    positions = []
    for g in dict.fromkeys(a.gpus):
        p = state.position.get((a.node, g))
        if p is None:
            out.append(Violation("unknown_gpu", f"{who}: {a.node} has no GPU {g}"))
        else:
            positions.append(p)
    if len({state.gpus[p].domain for p in positions}) > 1:
        out.append(
            Violation("tp_across_domains", f"{who}: GPUs {a.gpus} of {a.node} span NVLink domains")
        )
    return positions, out


def diagnose(
    instances: Sequence[Instance], state: ClusterState, pinned: Sequence[Assignment] = ()
) -> None:
    """Raise ``PlacementInfeasible`` for what no placement can overcome: a TP degree above every
    NVLink domain, or more GPUs (whole, or units in all) than free."""
    k = state.k
    widest = max(instances, key=lambda i: i.tp, default=None)
    if widest is not None and widest.tp > state.largest_domain:
        raise PlacementInfeasible(
            InfeasibleKind.TP_EXCEEDS_DOMAIN,
            f"{widest.model}: TP {widest.tp} needs one NVLink domain of {widest.tp} GPUs; the "
            f"largest domain of the cluster has {state.largest_domain}",
            model=widest.model,
            needed=widest.tp,
            available=state.largest_domain,
        )
    left = [g.free_units for g in state.gpus]
    for a in pinned:
        for g in a.gpus:
            left[state.position[(a.node, g)]] -= a.units
    need_units = sum(i.units * i.tp for i in instances)
    if need_units > sum(left):
        raise PlacementInfeasible(
            InfeasibleKind.NOT_ENOUGH_GPUS,
            f"the allocation needs {need_units / k:g} GPUs, {sum(left) / k:g} are free",
            needed=need_units / k,
            available=sum(left) / k,
        )
    whole = sum(i.tp for i in instances if i.units == k)
    free_whole = sum(1 for f in left if f == k)
    if whole > free_whole:
        raise PlacementInfeasible(
            InfeasibleKind.NOT_ENOUGH_GPUS,
            f"the allocation needs {whole} whole GPUs, {free_whole} are wholly free",
            needed=whole,
            available=free_whole,
        )


def check_instances(instances: Sequence[Instance], k: int) -> None:
    for i in instances:
        if i.units > k or (i.tp > 1 and i.units != k):
            raise InvalidInputError(
                f"{i.model}: {i.units}/{k} of a GPU on {i.tp} GPUs (a fraction needs tp 1)"
            )
