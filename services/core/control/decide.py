"""The control loop's decision: given what was observed, re-plan now, hold, or do nothing.

``step(state, observation, config)`` is called once a tick with the trace records that arrived
since the last tick, the current plan, the live nodes, and the operator's pause and pin. It
returns the new state, the ``Decision`` (or None) and what the loop sees, for its status. State
is passed in and returned, so a decision is a function of its inputs (tests drive it with a
scripted clock; the planner service with the wall clock).

**Drift** (each names its workflow or node, the value and the limit it crossed):

* ``rate_high``: the window's rate is above ``max(target x (1 + rate_noise),
  min(target x rate_up, throughput x rho))``: beyond the plan's headroom (the rate at which its
  busiest LLM reaches the utilisation cap) or ``rate_up`` times the target, but never inside the
  noise band around the target.
* ``rate_low``: below ``target x rate_down``.
* ``shares`` / ``fanout`` / ``tokens``: against the *baseline*, the window's statistics once the
  current plan has run for ``settle_s`` plus a whole window: an LLM's time share moved by more
  than ``share_delta`` (absolute), its calls per request by more than ``n_change`` (relative, or
  a new LLM is called), its mean prompt or completion length by more than ``tokens_change``
  (relative). Shares depend on the allocation, so they are compared with what was observed
  under this plan, never with the plan's prediction.
* ``latency``: the mean end-to-end latency is above ``latency_objective_s`` (when set).
* ``node_lost`` / ``node_joined``: a node of the plan has been gone, or a node outside it live,
  for ``node_grace_s``. Checked only for plans made on live nodes (every node of the plan
  carried an agent's heartbeat); a plan for a declared cluster is not the loop's to manage.

Idle workflows (``window.observe``) and workflows the plan does not serve never drift.

**Hysteresis.** A load drift must hold on every tick for ``sustain_s`` before it counts; a node
drift has its grace instead. After a change (by the loop or anyone: a new current plan) nothing
changes for ``min_interval_s``, except for a lost node (its engines are gone already). A
re-plan that failed is tried again after ``retry_s``; one that gave the same plan after
``min_interval_s``. A re-plan sets a drifted workflow's target to its observed rate, so the new
target sits in the middle of the new band.

**Operator.** Paused: statistics are kept, nothing is decided or recorded. Pinned: the current
plan is never replaced; a sustained drift is recorded once as held.

Decisions: ``replan`` (outcome ``pending`` until ``finished`` records ``changed``,
``unchanged`` or ``failed``, the new plan and the moves) and ``hold`` (why not now). The
operator's own actions are recorded with ``operator_decision``.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any, Literal

from services.core.control.moves import Moves, diff, moves_dict
from services.core.control.respec import respec, spec_workflows, traced_name
from services.core.control.window import (
    Record,
    TraceWindow,
    WorkflowWindow,
    observe,
    statistics,
)
from services.core.errors import InvalidInputError
from services.core.planning.plan import Plan
from services.core.workload.stats import WorkflowStats

DriftKind = Literal[
    "rate_high", "rate_low", "shares", "fanout", "tokens", "latency", "node_lost", "node_joined"
]
LOAD_KINDS = frozenset({"rate_high", "rate_low", "shares", "fanout", "tokens", "latency"})
STAT_KINDS = frozenset({"shares", "fanout", "tokens", "latency"})  # re-plan from the trace
Mode = Literal[
    "no_plan",
    "unmanaged",
    "paused",
    "no_live_nodes",
    "watching",
    "drifting",
    "pinned",
    "holding",
    "cooling",
    "replanning",
]
Action = Literal["replan", "hold", "pause", "resume", "pin", "unpin"]
Outcome = Literal["pending", "changed", "unchanged", "failed", "held", "done"]


@dataclass(frozen=True, slots=True)
class LoopConfig:
    """The loop's thresholds (module docstring); seconds, rates in requests/s."""

    window_s: float = 120.0
    sustain_s: float = 30.0
    min_interval_s: float = 300.0
    settle_s: float = 60.0
    retry_s: float = 60.0
    rate_up: float = 1.5
    rate_down: float = 0.5
    rate_noise: float = 0.2
    share_delta: float = 0.15
    n_change: float = 0.3
    tokens_change: float = 0.5
    latency_objective_s: float = 0.0  # 0: none
    node_grace_s: float = 15.0
    min_requests: int = 20
    stats_interval_s: float = 15.0  # n, p, shares, tokens refreshed this often (at most window/4)

    def __post_init__(self) -> None:
        for name in ("window_s", "rate_up", "rate_down", "share_delta", "n_change"):
            if not getattr(self, name) > 0:
                raise InvalidInputError(f"{name}: must be > 0, got {getattr(self, name)!r}")
        for name in (
            "sustain_s",
            "min_interval_s",
            "settle_s",
            "retry_s",
            "rate_noise",
            "tokens_change",
            "latency_objective_s",
            "node_grace_s",
            "stats_interval_s",
        ):
            if not getattr(self, name) >= 0:
                raise InvalidInputError(f"{name}: must be >= 0, got {getattr(self, name)!r}")
        if not self.rate_up > 1:
            raise InvalidInputError(f"rate_up: must be > 1, got {self.rate_up!r}")
        if not self.rate_down < 1:
            raise InvalidInputError(f"rate_down: must be < 1, got {self.rate_down!r}")
        if self.min_requests < 1:
            raise InvalidInputError(f"min_requests: must be >= 1, got {self.min_requests!r}")


@dataclass(frozen=True, slots=True)
class Drift:
    kind: DriftKind
    subject: str  # the workflow (as the plan names it) or the node
    detail: str  # for a person: what crossed what
    value: float
    limit: float

    @property
    def key(self) -> tuple[str, str]:
        return (self.kind, self.subject)


@dataclass(frozen=True, slots=True)
class Observation:
    """What the loop saw this tick."""

    now: float
    records: tuple[Record, ...]  # trace records that arrived since the last tick
    plan: Plan | None  # the current plan
    live_nodes: tuple[str, ...] | None  # names; None when they could not be read this tick
    paused: bool = False
    pinned: str | None = None  # the pinned plan id


@dataclass(frozen=True, slots=True)
class LoopState:
    window: TraceWindow
    plan_id: str | None = None
    plan_since: float = 0.0  # when the current plan became current (as far as the loop knows)
    last_change: float = -math.inf
    next_attempt: float = -math.inf  # no re-plan before (after a failed or unchanged one)
    baseline: Mapping[str, WorkflowWindow] = field(default_factory=dict)  # by traced name
    drift_since: Mapping[tuple[str, str], float] = field(default_factory=dict)
    absent_since: Mapping[str, float] = field(default_factory=dict)  # plan nodes not live
    present_since: Mapping[str, float] = field(default_factory=dict)  # live nodes not planned
    held: frozenset[tuple[str, str]] = frozenset()  # drifts already recorded as held
    saw_live: bool = False
    stats: Mapping[str, WorkflowStats] = field(default_factory=dict)  # the window's, as of
    stats_at: float = -math.inf


@dataclass(frozen=True, slots=True)
class Decision:
    at: float
    action: Action
    reasons: tuple[Drift, ...]
    old_plan: str | None
    new_plan: str | None = None
    outcome: Outcome = "pending"
    detail: str = ""
    rates: Mapping[str, float] = field(default_factory=dict)  # new targets, by workflow
    traced: tuple[str, ...] = ()  # workflows re-planned from the router's trace
    spec_text: str = ""  # what a re-plan plans (not recorded: the new plan holds it)
    moves: Moves | None = None


@dataclass(frozen=True, slots=True)
class Tick:
    state: LoopState
    decision: Decision | None
    mode: Mode
    view: Mapping[str, WorkflowWindow]  # the window's statistics, by traced name
    drifts: tuple[tuple[Drift, float], ...] = ()  # current drifts and since when
    next_change_at: float | None = None  # the earliest time a non-urgent change may happen


def initial_state(config: LoopConfig) -> LoopState:
    return LoopState(window=TraceWindow(config.window_s))


def step(state: LoopState, obs: Observation, config: LoopConfig) -> Tick:
    """One tick of the loop (module docstring)."""
    now = obs.now
    state = replace(state, window=state.window.add(obs.records, now))
    if now - state.stats_at >= min(config.stats_interval_s, config.window_s / 4):
        state = replace(state, stats=statistics(state.window, now), stats_at=now)
    view = observe(state.window, now, config.min_requests, state.stats)
    plan = obs.plan
    if plan is None:
        return Tick(_forget(state), None, "no_plan", view)
    if plan.id != state.plan_id:
        since = plan.created_at if state.plan_id is None else now
        state = replace(
            _forget(state),
            plan_id=plan.id,
            plan_since=since,
            last_change=max(state.last_change, since),
            baseline={},
        )
    if not _on_live_nodes(plan):
        return Tick(_forget(state), None, "unmanaged", view)
    state = _update_baseline(state, view, plan, now, config)
    if obs.paused:
        return Tick(_forget(state), None, "paused", view)
    live = None if obs.live_nodes is None else frozenset(obs.live_nodes)
    if live is not None and not live:
        # every agent gone (or Redis lost the records): re-planning now could only plan on
        # nothing; wait for nodes to come back
        return Tick(_forget(state), None, "no_live_nodes", view)
    if live is not None:
        state = replace(state, saw_live=True, **_node_times(state, plan, live, now))
    load = _load_drifts(plan, view, state.baseline, config)
    started = {d.key: state.drift_since.get(d.key, now) for d in load}
    state = replace(state, drift_since=started)
    nodes = _node_drifts(state, plan, now, config)
    drifts = tuple((d, started[d.key]) for d in load) + tuple(
        (d, now - config.node_grace_s) for d in nodes
    )
    sustained = tuple(d for d in load if now - started[d.key] >= config.sustain_s) + nodes
    next_change = max(state.last_change + config.min_interval_s, state.next_attempt)
    if not sustained:
        mode: Mode = "drifting" if drifts else "watching"
        return Tick(replace(state, held=frozenset()), None, mode, view, drifts, next_change)
    keys = frozenset(d.key for d in sustained)
    if obs.pinned:
        return _hold(state, sustained, keys, plan, now, "pinned", f"plan {obs.pinned} is pinned",
                     view, drifts, next_change)  # fmt: skip
    if now < state.next_attempt:
        return Tick(state, None, "cooling", view, drifts, next_change)
    urgent = any(d.kind == "node_lost" for d in sustained)
    allowed_at = state.last_change + config.min_interval_s
    if not urgent and now < allowed_at:
        why = f"minimum interval: no change before {allowed_at:.0f} (in {allowed_at - now:.0f} s)"
        return _hold(state, sustained, keys, plan, now, "holding", why, view, drifts, next_change)
    decision = _replan(plan, sustained, view, now)
    state = replace(state, next_attempt=now + config.retry_s, held=frozenset())
    return Tick(state, decision, "replanning", view, drifts, next_change)


def finished(
    state: LoopState,
    decision: Decision,
    now: float,
    config: LoopConfig,
    old: Plan,
    new: Plan | None,
    error: str = "",
) -> tuple[LoopState, Decision]:
    """Record how a ``replan`` decision ended: ``new`` is the plan made (None with ``error``)."""
    if new is None:
        failed = replace(decision, outcome="failed", detail=error or "no plan was made")
        return replace(state, next_attempt=now + config.retry_s), failed
    if new.id == old.id:
        same = replace(
            decision, new_plan=new.id, outcome="unchanged", detail="the re-plan gave this plan"
        )
        return replace(state, next_attempt=now + config.min_interval_s), same
    moves = diff(old.placement.assignments, new.placement.assignments, new.fraction_unit)
    changed = replace(decision, new_plan=new.id, outcome="changed", moves=moves)
    state = replace(
        _forget(state),
        plan_id=new.id,
        plan_since=now,
        last_change=now,
        next_attempt=-math.inf,
        baseline={},
    )
    return state, changed


def operator_decision(
    action: Action, now: float, plan_id: str | None, detail: str = ""
) -> Decision:
    """The record of an operator's pause, resume, pin or unpin."""
    return Decision(now, action, (), plan_id, outcome="done", detail=detail)


# ------------------------------------------------------------------------------ drift
def _on_live_nodes(plan: Plan) -> bool:
    return bool(plan.nodes) and all(n.heartbeat_at > 0 for n in plan.nodes)


def _workflow_names(plan: Plan) -> dict[str, str]:
    """Plan workflow name -> the name its calls carry in the trace."""
    named = dict(_traced_names(plan.spec_text))
    return {w.workflow: named.get(w.workflow, w.workflow) for w in plan.workflows}


@functools.lru_cache(maxsize=32)
def _traced_names(spec_text: str) -> tuple[tuple[str, str], ...]:
    """(spec name, traced name) of each workflow (parsed once per spec, not once per tick)."""
    try:
        return tuple((str(w.get("name")), traced_name(w)) for w in spec_workflows(spec_text))
    except InvalidInputError:
        return ()


def _load_drifts(
    plan: Plan,
    view: Mapping[str, WorkflowWindow],
    baseline: Mapping[str, WorkflowWindow],
    config: LoopConfig,
) -> tuple[Drift, ...]:
    out: list[Drift] = []
    names = _workflow_names(plan)
    for forecast in plan.workflows:
        w = view.get(names[forecast.workflow])
        if w is None or w.idle:
            continue
        name, target = forecast.workflow, forecast.target_rps
        headroom = forecast.throughput_rps * plan.rho
        upper = max(target * (1 + config.rate_noise), min(target * config.rate_up, headroom))
        lower = target * config.rate_down
        if w.rate_rps > upper:
            out.append(
                Drift(
                    "rate_high",
                    name,
                    f"{w.rate_rps:.3g} req/s > {upper:.3g} (target {target:.3g}, plan's "
                    f"headroom {headroom:.3g})",
                    w.rate_rps,
                    upper,
                )
            )
        elif w.rate_rps < lower:
            out.append(
                Drift(
                    "rate_low",
                    name,
                    f"{w.rate_rps:.3g} req/s < {lower:.3g} (target {target:.3g} x "
                    f"{config.rate_down:g})",
                    w.rate_rps,
                    lower,
                )
            )
        base = baseline.get(names[forecast.workflow])
        if base is not None:
            out.extend(_stat_drifts(name, w, base, config))
        if config.latency_objective_s > 0 and w.e2e_s > config.latency_objective_s:
            out.append(
                Drift(
                    "latency",
                    name,
                    f"mean end-to-end {w.e2e_s:.3g} s > objective {config.latency_objective_s:g} s",
                    w.e2e_s,
                    config.latency_objective_s,
                )
            )
    return tuple(out)


def _stat_drifts(
    name: str, w: WorkflowWindow, base: WorkflowWindow, config: LoopConfig
) -> list[Drift]:
    out: list[Drift] = []
    shares, fanout, tokens = [], [], []
    for m in w.llms:
        b = base.llm(m.model)
        if b is None:
            fanout.append((f"{m.model} newly called ({m.n:.3g} calls/request)", m.n, 0.0))
            continue
        moved = abs(m.share - b.share)
        if moved > config.share_delta:
            shares.append((f"{m.model} share {b.share:.2f} -> {m.share:.2f}", moved))
        change = abs(m.n - b.n) / b.n if b.n > 0 else math.inf
        if change > config.n_change:
            fanout.append((f"{m.model} calls/request {b.n:.3g} -> {m.n:.3g}", change, b.n))
        if config.tokens_change > 0:
            for what, now_t, base_t in (
                ("prompt", m.prompt_tokens, b.prompt_tokens),
                ("completion", m.completion_tokens, b.completion_tokens),
            ):
                rel = abs(now_t - base_t) / base_t if base_t > 0 else 0.0
                if rel > config.tokens_change:
                    tokens.append((f"{m.model} {what} tokens {base_t:.0f} -> {now_t:.0f}", rel))
    if shares:
        worst = max(shares, key=lambda s: s[1])
        text = "; ".join(s[0] for s in shares)
        out.append(Drift("shares", name, text, worst[1], config.share_delta))
    if fanout:
        worst_f = max(fanout, key=lambda s: s[1])
        text = "; ".join(s[0] for s in fanout)
        out.append(Drift("fanout", name, text, worst_f[1], config.n_change))
    if tokens:
        worst_t = max(tokens, key=lambda s: s[1])
        text = "; ".join(s[0] for s in tokens)
        out.append(Drift("tokens", name, text, worst_t[1], config.tokens_change))
    return out


def _update_baseline(
    state: LoopState,
    view: Mapping[str, WorkflowWindow],
    plan: Plan,
    now: float,
    config: LoopConfig,
) -> LoopState:
    """Take each workflow's baseline once the plan has settled and a whole window ran under it:
    from statistics computed since, of a workflow active for most of the window."""
    ready = state.plan_since + config.settle_s + config.window_s
    if now < ready or state.stats_at < ready:
        return state
    wanted = set(_workflow_names(plan).values())
    new = {
        name: w
        for name, w in view.items()
        if name in wanted
        and not w.idle
        and w.span_s >= config.window_s / 2
        and name not in state.baseline
    }
    if not new:
        return state
    return replace(state, baseline={**state.baseline, **new})


def _node_times(state: LoopState, plan: Plan, live: frozenset[str], now: float) -> dict[str, Any]:
    planned = {n.name for n in plan.nodes}
    absent = {n: state.absent_since.get(n, now) for n in sorted(planned - live)}
    present = {n: state.present_since.get(n, now) for n in sorted(live - planned)}
    return {"absent_since": absent, "present_since": present}


def _node_drifts(state: LoopState, plan: Plan, now: float, config: LoopConfig) -> tuple[Drift, ...]:
    out: list[Drift] = []
    hosting = {a.node for a in plan.placement.assignments}
    for node, since in state.absent_since.items():
        if now - since >= config.node_grace_s:
            engines = sum(a.node == node for a in plan.placement.assignments)
            what = f"{engines} engine(s) of the plan ran there" if node in hosting else "no engines"
            out.append(
                Drift("node_lost", node, f"gone for {now - since:.0f} s; {what}", now - since,
                      config.node_grace_s)
            )  # fmt: skip
    for node, since in state.present_since.items():
        if now - since >= config.node_grace_s:
            out.append(
                Drift("node_joined", node, f"live for {now - since:.0f} s, not in the plan",
                      now - since, config.node_grace_s)
            )  # fmt: skip
    return tuple(out)


# --------------------------------------------------------------------------- decisions
def _replan(
    plan: Plan, sustained: tuple[Drift, ...], view: Mapping[str, WorkflowWindow], now: float
) -> Decision:
    names = _workflow_names(plan)
    load = [d for d in sustained if d.kind in LOAD_KINDS]
    rates = {d.subject: view[names[d.subject]].rate_rps for d in load}
    traced = tuple(sorted({d.subject for d in load if d.kind in STAT_KINDS}))
    spec = respec(plan.spec_text, rates, frozenset(traced))
    return Decision(
        at=now,
        action="replan",
        reasons=sustained,
        old_plan=plan.id,
        rates={k: float(f"{v:.4g}") for k, v in sorted(rates.items())},
        traced=traced,
        spec_text=spec,
    )


def _hold(
    state: LoopState,
    sustained: tuple[Drift, ...],
    keys: frozenset[tuple[str, str]],
    plan: Plan,
    now: float,
    mode: Mode,
    why: str,
    view: Mapping[str, WorkflowWindow],
    drifts: tuple[tuple[Drift, float], ...],
    next_change: float,
) -> Tick:
    """Hold: recorded once for each drift (a new drift is recorded again)."""
    if keys <= state.held:
        return Tick(state, None, mode, view, drifts, next_change)
    decision = Decision(now, "hold", sustained, plan.id, outcome="held", detail=why)
    return Tick(replace(state, held=state.held | keys), decision, mode, view, drifts, next_change)


def _forget(state: LoopState) -> LoopState:
    """The state without drift timers (after a change, while paused or unmanaged)."""
    return replace(state, drift_since={}, absent_since={}, present_since={}, held=frozenset())


def decision_dict(d: Decision) -> dict[str, Any]:
    """JSON-ready form of a decision (the spec text left out)."""
    return {
        "at": d.at,
        "action": d.action,
        "outcome": d.outcome,
        "detail": d.detail,
        "old_plan": d.old_plan,
        "new_plan": d.new_plan,
        "reasons": [
            {
                "kind": r.kind,
                "subject": r.subject,
                "detail": r.detail,
                "value": r.value if math.isfinite(r.value) else None,
                "limit": r.limit,
            }
            for r in d.reasons
        ],
        "rates": dict(d.rates),
        "traced": list(d.traced),
        **(moves_dict(d.moves) if d.moves is not None else {"kept": None, "moves": []}),
    }
