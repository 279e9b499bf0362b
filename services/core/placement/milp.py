"""The exact placement: a MILP solved by HiGHS, for small clusters and for judging the heuristic.

Same input, hard rules and objective as ``services.core.placement.heuristic``: it minimises
``Fragmentation.key`` (stranded units, then the largest free TP group, then broken domains, then
partly used GPUs) lexicographically, by weighting each term above the largest possible total of
the terms after it. ``highspy`` is imported inside ``place_exact`` so that importing
``services.core`` stays light.

Formulation (instances of one (model, tp, units) form a class c with r_c replicas; replicas are
interchangeable, which removes their symmetry from the search):

* whole-GPU class, TP t: ``a[c,g]`` binary (GPU g wholly serves c), ``n[c,d]`` integer (groups of c
  in domain d): ``sum_{g in d} a[c,g] = t n[c,d]``, ``sum_d n[c,d] = r_c``. Any t of a domain's GPUs
  form a group, because a domain's GPUs all reach each other over NVLink;
* fractional class, u units: ``m[c,g]`` integer (its replicas on g), ``sum_g m[c,g] = r_c``;
* ``used_g = k sum_c a[c,g] + sum_c u_c m[c,g] <= free_g``; a wholly free GPU g gets ``touched_g``
  (``used_g <= k touched_g``), every GPU ``full_g`` (``free_g full_g <= used_g``);
* stranded units = ``k sum touched_g`` + a constant; partly used = touched (or already partly
  used) minus full; a domain is broken unless all its GPUs stay wholly free (``e_d``) or none does
  (``o_d``); level t of the largest free TP group is reached (``w_t``) when some domain keeps t
  wholly free GPUs (``z[d,t]``).

TP groups get their domain's GPUs in index order (NUMA is not modelled).
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field

from services.core.allocation import TP_DEGREES
from services.core.errors import InfeasibleError
from services.core.placement.rules import (
    Assignment,
    ClusterState,
    InfeasibleKind,
    Instance,
    Placement,
    PlacementInfeasible,
    diagnose,
    make_assignment,
    make_placement,
)

_Class = tuple[str, int, int]  # (model, tp, units)


@dataclass(frozen=True, slots=True)
class ExactResult:
    placement: Placement
    optimal: bool  # False: the time limit ended the search; the best placement found
    seconds: float
    objective: float


@dataclass
class _Milp:
    """Columns and rows of a MILP under construction (all columns integer)."""

    cost: list[float] = field(default_factory=list)
    lower: list[float] = field(default_factory=list)
    upper: list[float] = field(default_factory=list)
    rows: list[tuple[float, float, dict[int, float]]] = field(default_factory=list)

    def var(self, upper: float, cost: float = 0.0, lower: float = 0.0) -> int:
        self.cost.append(cost)
        self.lower.append(lower)
        self.upper.append(upper)
        return len(self.cost) - 1

    def row(self, coefs: dict[int, float], lower: float, upper: float) -> None:
        self.rows.append((lower, upper, coefs))


@dataclass
class _Vars:
    whole: dict[tuple[_Class, int], int] = field(default_factory=dict)  # a[c, g]
    frac: dict[tuple[_Class, int], int] = field(default_factory=dict)  # m[c, g]


def place_exact(
    instances: Sequence[Instance], state: ClusterState, *, time_limit_s: float = 60.0
) -> ExactResult:
    """The placement minimising ``Fragmentation.key`` (proven optimal unless the time limit hits).

    Raises ``PlacementInfeasible`` (the kind found by ``placement.diagnose``, else
    ``tp_group_does_not_fit`` when the TP groups alone do not place, else
    ``fractions_do_not_pack``) when no placement exists.
    """
    diagnose(instances, state)
    started = time.perf_counter()
    classes = Counter((i.model, i.tp, i.units) for i in instances)
    milp, chosen = _build(classes, state)
    solved = _solve(milp, time_limit_s)
    if solved is None:
        raise _why_not(classes, state, time_limit_s)
    values, objective, optimal = solved
    assignments = _decode(instances, state, chosen, values)
    return ExactResult(
        make_placement(state, assignments), optimal, time.perf_counter() - started, objective
    )


def _build(classes: Counter[_Class], state: ClusterState) -> tuple[_Milp, _Vars]:
    """The MILP of the module docstring; weights make the objective lexicographic."""
    k = state.k
    free = [g.free_units for g in state.gpus]
    levels = [t for t in TP_DEGREES if t <= state.largest_domain]
    w_part = 1.0
    w_broken = len(free) + 1.0
    w_level = w_broken * (len(state.domains) + 1)
    w_strand = w_level * (len(levels) + 1)
    milp, chosen = _Milp(), _Vars()
    _assignment_vars(milp, chosen, classes, state)
    touched: dict[int, int] = {}
    for p, f in enumerate(free):
        if f == 0:
            continue
        used = _used(chosen, p, k)
        full = milp.var(1, -w_part)
        milp.row({c: -v for c, v in used.items()} | {full: f}, -_INF, 0.0)
        if f == k:
            touched[p] = milp.var(1, w_strand * k + w_part)
            milp.row(used | {touched[p]: -k}, -_INF, 0.0)
        else:
            milp.row(used, -_INF, f)
    _domain_terms(milp, state, touched, w_broken, w_level, levels)
    return milp, chosen


def _assignment_vars(
    milp: _Milp, chosen: _Vars, classes: Counter[_Class], state: ClusterState
) -> None:
    """a, n (whole-GPU classes) and m (fractional classes) with their replica-count rows."""
    k = state.k
    free = [g.free_units for g in state.gpus]
    for c, replicas in sorted(classes.items()):
        _, tp, units = c
        if units < k:
            cols = {}
            for p, f in enumerate(free):
                if f >= units:
                    cols[p] = chosen.frac[(c, p)] = milp.var(min(replicas, f // units))
            milp.row(dict.fromkeys(cols.values(), 1.0), replicas, replicas)
            continue
        groups: dict[int, float] = {}
        for d in state.domains:
            members = [p for p in d if free[p] == k]
            if len(members) < tp:
                continue
            cols = {p: milp.var(1) for p in members}
            chosen.whole.update({(c, p): col for p, col in cols.items()})
            n = milp.var(len(members) // tp)
            groups[n] = 1.0
            milp.row(dict.fromkeys(cols.values(), 1.0) | {n: -float(tp)}, 0.0, 0.0)
        milp.row(groups, replicas, replicas)


def _used(chosen: _Vars, p: int, k: int) -> dict[int, float]:
    used = {col: float(k) for (_, q), col in chosen.whole.items() if q == p}
    used |= {col: float(c[2]) for (c, q), col in chosen.frac.items() if q == p}
    return used


def _domain_terms(
    milp: _Milp,
    state: ClusterState,
    touched: dict[int, int],
    w_broken: float,
    w_level: float,
    levels: list[int],
) -> None:
    """e_d / o_d (a domain is not broken) and z[d,t] / w_t (free TP level t is reached)."""
    reach: dict[int, dict[int, float]] = {t: {} for t in levels}
    for d in state.domains:
        members = [touched[p] for p in d if p in touched]
        if not members:
            continue
        if len(members) == len(d):
            e = milp.var(1, -w_broken)
            for col in members:
                milp.row({e: 1.0, col: 1.0}, -_INF, 1.0)
        o = milp.var(1, -w_broken)
        for col in members:
            milp.row({o: 1.0, col: -1.0}, -_INF, 0.0)
        for t in levels:
            if t <= len(members):
                z = milp.var(1)
                reach[t][z] = -1.0
                milp.row(dict.fromkeys(members, 1.0) | {z: float(t)}, -_INF, len(members))
    for coefs in reach.values():
        if coefs:
            w = milp.var(1, -w_level)
            milp.row(coefs | {w: 1.0}, -_INF, 0.0)


def _solve(milp: _Milp, time_limit_s: float) -> tuple[list[float], float, bool] | None:
    """(values, objective, proven optimal); None when infeasible."""
    import highspy
    import numpy as np

    lp = highspy.HighsLp()
    lp.num_col_ = len(milp.cost)
    lp.num_row_ = len(milp.rows)
    lp.col_cost_ = np.array(milp.cost, dtype=np.float64)
    lp.col_lower_ = np.array(milp.lower, dtype=np.float64)
    lp.col_upper_ = np.array(milp.upper, dtype=np.float64)
    lp.row_lower_ = np.array([r[0] for r in milp.rows], dtype=np.float64)
    lp.row_upper_ = np.array([r[1] for r in milp.rows], dtype=np.float64)
    starts: list[int] = [0]
    index: list[int] = []
    value: list[float] = []
    for _, _, coefs in milp.rows:
        index.extend(coefs)
        value.extend(coefs.values())
        starts.append(len(index))
    lp.a_matrix_.format_ = highspy.MatrixFormat.kRowwise
    lp.a_matrix_.num_col_ = lp.num_col_
    lp.a_matrix_.num_row_ = lp.num_row_
    lp.a_matrix_.start_ = np.array(starts, dtype=np.int32)
    lp.a_matrix_.index_ = np.array(index, dtype=np.int32)
    lp.a_matrix_.value_ = np.array(value, dtype=np.float64)
    lp.integrality_ = [highspy.HighsVarType.kInteger] * lp.num_col_
    h = highspy.Highs()  # type: ignore[no-untyped-call]  # highspy's __init__ is unannotated
    for option, setting in _OPTIONS.items():
        h.setOptionValue(option, setting)
    h.setOptionValue("time_limit", float(time_limit_s))
    h.passModel(lp)
    h.run()
    status = h.getModelStatus()
    if status == highspy.HighsModelStatus.kInfeasible:
        return None
    solution = h.getSolution()
    if status != highspy.HighsModelStatus.kOptimal and not solution.value_valid:
        raise InfeasibleError(
            f"the placement MILP found no solution ({h.modelStatusToString(status)}) "
            f"within {time_limit_s:g}s"
        )
    objective = float(h.getInfo().objective_function_value)
    return list(solution.col_value), objective, status == highspy.HighsModelStatus.kOptimal


# The objective is integral: an absolute gap below 1 proves optimality.
_OPTIONS: dict[str, bool | float | int] = {
    "output_flag": False,
    "mip_rel_gap": 0.0,
    "mip_abs_gap": 0.5,
    "random_seed": 0,
}


def _decode(
    instances: Sequence[Instance], state: ClusterState, chosen: _Vars, values: list[float]
) -> list[Assignment]:
    """Assignments from a solution; replica ids in the order of ``instances``."""
    k, margin = state.k, state.memory_margin
    ids: dict[_Class, list[int]] = {}
    for i in instances:
        ids.setdefault((i.model, i.tp, i.units), []).append(i.replica)
    slots: dict[_Class, list[tuple[str, tuple[int, ...]]]] = {c: [] for c in ids}
    groups: dict[tuple[_Class, int], list[int]] = {}
    for (c, p), col in sorted(chosen.whole.items()):
        if values[col] > 0.5:
            groups.setdefault((c, state.gpus[p].domain), []).append(p)
    for (c, _), members in sorted(groups.items()):
        tp = c[1]
        for start in range(0, len(members), tp):
            chunk = members[start : start + tp]
            slots[c].append((state.gpus[chunk[0]].node, tuple(state.gpus[q].index for q in chunk)))
    for (c, p), col in sorted(chosen.frac.items()):
        slots[c].extend([(state.gpus[p].node, (state.gpus[p].index,))] * round(values[col]))
    return [
        make_assignment(c[0], rid, node, gpus, c[2], k, margin)
        for c, places in slots.items()
        for rid, (node, gpus) in zip(ids[c], places, strict=True)
    ]


def _why_not(classes: Counter[_Class], state: ClusterState, time_limit_s: float) -> Exception:
    """The kind of an infeasible MILP: do the TP groups alone place?"""
    whole = Counter({c: r for c, r in classes.items() if c[2] == state.k})
    widest = max(whole, key=lambda c: c[1], default=None)
    if widest is not None and _solve(_build(whole, state)[0], time_limit_s) is None:
        k = state.k
        block = max(
            (sum(state.gpus[p].free_units == k for p in d) for d in state.domains), default=0
        )
        return PlacementInfeasible(
            InfeasibleKind.TP_GROUP_DOES_NOT_FIT,
            f"{widest[0]}: the TP groups do not fit in the blocks of wholly free GPUs of the "
            f"NVLink domains (largest block {block})",
            model=widest[0],
            needed=widest[1],
            available=block,
        )
    return PlacementInfeasible(
        InfeasibleKind.FRACTIONS_DO_NOT_PACK,
        "the fractional instances do not pack into the free GPU capacity",
    )


_INF = float("inf")
