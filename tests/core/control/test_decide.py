"""The control loop's decisions, driven tick by tick with a scripted clock.

Every scenario feeds ``step`` the trace records that ended since the last tick (5 s apart),
the live nodes and the operator's flags, then checks what was decided and when. Expected
times are derived by hand in each test's comment from the window arithmetic: with a window of
W s, requests counted by their first call's start, the rate read at time t after a step from
r0 to r1 at time T (T + W > t) is (r0 (W - (t - T)) + r1 (t - T)) / W.
"""

from __future__ import annotations

import bisect
import dataclasses
import functools
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import pytest

from services.core.control.decide import (
    Decision,
    LoopConfig,
    LoopState,
    Observation,
    decision_dict,
    finished,
    initial_state,
    step,
)
from services.core.control.respec import spec_workflows
from services.core.errors import InvalidInputError
from services.core.planning.plan import Plan, spec_from_text
from services.core.workload.trace import TraceCall
from tests.core.planning.test_plan import build_plan

TICK = 5.0
# Two nodes of 2 H100 each; A and B are the synthetic profiles' models.
SPEC = """
version: 1
fraction_unit: 4
rho: 0.8
cluster:
  version: 1
  nodes:
    - {{name: n1, gpu_type: H100-SXM, gpus: 2, interconnect: nvswitch}}
    - {{name: n2, gpu_type: H100-SXM, gpus: 2, interconnect: nvswitch}}
models:
  A: Qwen/Qwen2.5-0.5B
  B: Qwen/Qwen3-0.6B
workflows:
  - name: w
    rate: {rate}
    stats:
      llms:
        A: {{n: 2, prompt_tokens: 100, completion_tokens: 10}}
        B: {{n: 1, prompt_tokens: 100, completion_tokens: 10}}
"""
CONFIG = LoopConfig(
    window_s=120.0,
    sustain_s=30.0,
    min_interval_s=300.0,
    settle_s=30.0,
    retry_s=60.0,
    node_grace_s=15.0,
    min_requests=20,
)


@functools.cache
def make_plan(rate: float = 2.0, throughput: float = 10.0, live: bool = True) -> Plan:
    """A real plan (synthetic profiles) whose predicted throughput is set to ``throughput``, so
    its headroom is known: throughput x rho = 8 req/s by default."""
    text = SPEC.format(rate=rate)
    plan = build_plan(text, spec_from_text(text), created_at=0.0)
    nodes = tuple(dataclasses.replace(n, heartbeat_at=1.0 if live else 0.0) for n in plan.nodes)
    workflows = tuple(dataclasses.replace(w, throughput_rps=throughput) for w in plan.workflows)
    return dataclasses.replace(plan, nodes=nodes, workflows=workflows)


def other_plan(plan: Plan, rate: float) -> Plan:
    """The plan a re-plan at ``rate`` would give: same placement, that target, another id."""
    workflows = tuple(dataclasses.replace(w, target_rps=rate) for w in plan.workflows)
    return dataclasses.replace(plan, id=f"{plan.id[:8]}{int(rate * 1000):08d}", workflows=workflows)


def requests(
    start: float,
    end: float,
    rate: Callable[[float], float],
    *,
    workflow: str = "w",
    tag: str = "",
    a_calls: int = 2,
    a_s: float = 0.5,
    b_s: float = 0.25,
    prompt: int = 100,
) -> list[TraceCall]:
    """Requests arriving at ``rate(t)`` per second from ``start`` to ``end`` (evenly spaced):
    ``a_calls`` sequential calls to A of ``a_s`` s, then one call to B of ``b_s`` s."""
    calls: list[TraceCall] = []
    t, i = start, 0
    while t < end:
        rid = f"{workflow}-{tag}{i}"
        s = t
        for j in range(a_calls):
            calls.append(TraceCall(workflow, rid, f"a{j}", "A", s, s + a_s, prompt, 10))
            s += a_s
        calls.append(TraceCall(workflow, rid, "b", "B", s, s + b_s, prompt, 10))
        i += 1
        t += 1.0 / rate(t)
    return calls


def noisy(base: float, spread: float) -> Callable[[float], float]:
    """A rate that wanders around ``base`` by +-``spread`` (relative), every 10 s."""
    pattern = (0.0, 1.0, -0.6, 0.4, -1.0, 0.7, -0.3, 0.9, -0.8, 0.2)
    return lambda t: base * (1 + spread * pattern[int(t // 10) % len(pattern)])


@dataclass
class Run:
    """Drives ``step`` over scripted time; records decisions and modes."""

    plan: Plan
    calls: list[TraceCall]
    config: LoopConfig = CONFIG
    live: Callable[[float], Sequence[str] | None] = lambda t: ("n1", "n2")
    paused: Callable[[float], bool] = lambda t: False
    pinned: Callable[[float], str | None] = lambda t: None
    # what a re-plan returns: a plan, or an error text
    replan: Callable[[Decision], Plan | str] | None = None
    state: LoopState = field(init=False)
    decisions: list[Decision] = field(default_factory=list)
    modes: dict[float, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.state = initial_state(self.config)
        self.calls = sorted(self.calls, key=lambda c: c.end)

    def until(self, end: float, start: float = TICK) -> Run:
        t = start
        ends = [c.end for c in self.calls]
        while t <= end:
            lo, hi = bisect.bisect_right(ends, t - TICK), bisect.bisect_right(ends, t)
            arrived = tuple(self.calls[lo:hi])
            obs = Observation(
                now=t,
                records=arrived,
                plan=self.plan,
                live_nodes=None if (n := self.live(t)) is None else tuple(n),
                paused=self.paused(t),
                pinned=self.pinned(t),
            )
            tick = step(self.state, obs, self.config)
            self.state = tick.state
            self.modes[t] = tick.mode
            if tick.decision is not None:
                decision = tick.decision
                if decision.action == "replan":
                    result = self.replan(decision) if self.replan else self.default(decision)
                    new = result if isinstance(result, Plan) else None
                    error = result if isinstance(result, str) else ""
                    self.state, decision = finished(
                        self.state, decision, t, self.config, self.plan, new, error
                    )
                    if new is not None:
                        self.plan = new
                self.decisions.append(decision)
            t += TICK
        return self

    def default(self, decision: Decision) -> Plan:
        """A re-plan at the decision's rate on the live nodes."""
        (w,) = self.plan.workflows
        new = other_plan(self.plan, decision.rates.get("w", w.target_rps + 0.001))
        live = self.live(decision.at) or ()
        nodes = tuple(dataclasses.replace(self.plan.nodes[0], name=n) for n in live)
        return dataclasses.replace(new, nodes=nodes)

    def of(self, action: str) -> list[Decision]:
        return [d for d in self.decisions if d.action == action]


def rate_step(before: float, after: float, at: float) -> Callable[[float], float]:
    return lambda t: before if t < at else after


# ------------------------------------------------------------------------------ rate
@pytest.mark.parametrize(
    "name, rate",
    [
        # +-15% around the target 2 req/s, changing every 10 s: the window average stays in
        # [1.0, 3.0] (target x 0.5, target x 1.5; the headroom 8 is further away)
        ("noise around the target", noisy(2.0, 0.15)),
        # +-40% excursions: single 10 s stretches reach 2.8 req/s, never the window average
        ("wide noise around the target", noisy(2.0, 0.4)),
        # a 40 s burst at double rate: the window peaks at (2 x 80 + 4 x 40) / 120 = 2.67 < 3
        ("a short burst", lambda t: 4.0 if 600 <= t < 640 else 2.0),
    ],
)
def test_no_replan_under_noise(name: str, rate: Callable[[float], float]) -> None:
    run = Run(make_plan(2.0), requests(0, 1200, rate)).until(1200)
    assert run.decisions == [], name
    assert run.modes[1200] == "watching"


def test_sustained_doubling_replans_at_the_observed_rate() -> None:
    # 2 -> 4 req/s at t = 600. The window reads 2 + (t - 600) / 60, above 3.0 from t > 660;
    # sustained 30 s: the re-plan comes at the first tick >= 690 (a tick or two of slack for
    # the evenly spaced arrivals).
    plan = make_plan(2.0)
    seen: list[Decision] = []

    def replan(d: Decision) -> Plan:
        seen.append(d)
        return other_plan(plan, d.rates["w"])

    run = Run(plan, requests(0, 900, rate_step(2.0, 4.0, 600)), replan=replan).until(900)
    (decision,) = run.of("replan")
    assert 690 <= decision.at <= 700
    assert decision.outcome == "changed" and decision.old_plan == plan.id
    assert decision.new_plan == run.plan.id != plan.id
    (reason,) = decision.reasons
    assert (reason.kind, reason.subject, reason.limit) == ("rate_high", "w", 3.0)
    # the new target is the window's rate when it fired: between 3 and 4 req/s
    assert 3.0 < decision.rates["w"] <= 4.0 and decision.traced == ()
    (w,) = spec_workflows(seen[0].spec_text)
    assert w["rate"] == decision.rates["w"] and "stats" in w  # only the rate changed
    assert all(m in ("watching", "drifting", "replanning") for m in run.modes.values())
    doc = decision_dict(decision)
    assert doc["reasons"][0]["kind"] == "rate_high" and doc["new_plan"] == run.plan.id


def test_rate_far_below_replans_down() -> None:
    # 2 -> 0.5 req/s at t = 600: the window reads 2 - 1.5 (t - 600) / 120 < 1.0 from t > 680;
    # plus 30 s sustained: about t = 710 (the rate right after the step still counts old
    # requests, so a tick later is fine).
    run = Run(make_plan(2.0), requests(0, 1000, rate_step(2.0, 0.5, 600))).until(1000)
    (decision,) = run.of("replan")
    assert 705 <= decision.at <= 720
    assert decision.reasons[0].kind == "rate_low" and 0.5 <= decision.rates["w"] < 1.0


def test_the_headroom_bounds_the_upper_limit() -> None:
    # a plan with little headroom: throughput 2.5 x rho 0.8 = 2.0 = the target, so the upper
    # limit is the noise band, 2 x 1.2 = 2.4; 2.8 req/s (x 1.4, inside rate_up) re-plans
    plan = make_plan(2.0, throughput=2.5)
    run = Run(plan, requests(0, 900, rate_step(2.0, 2.8, 300))).until(900)
    (decision,) = run.of("replan")
    assert decision.reasons[0].limit == pytest.approx(2.4)
    # the same traffic against ample headroom (limit 3.0) does nothing
    assert (
        Run(make_plan(2.0), requests(0, 900, rate_step(2.0, 2.8, 300))).until(900).decisions == []
    )


def test_a_workflow_coming_back_from_idle_is_not_far_below() -> None:
    # no traffic until t = 600, then the target rate: the rate is measured over the time since
    # the first request (not the whole window), so it reads about 2 at once
    run = Run(make_plan(2.0), requests(600, 1200, lambda t: 2.0)).until(1200)
    assert run.decisions == []
    assert run.modes[300] == "watching"


# ------------------------------------------------------------------------ min interval
def test_minimum_interval_between_changes() -> None:
    # 2 -> 4 at t = 600 re-plans at ~690 (as above) to ~3.5 req/s; 4 -> 8 at t = 750 drifts
    # again (8 > 1.5 x 3.5 from ~t = 800, sustained by ~830), but the next change may come
    # only at 690 + 300 = 990: one hold record, then the re-plan at the first tick >= 990.
    rate = lambda t: 2.0 if t < 600 else 4.0 if t < 750 else 8.0  # noqa: E731
    run = Run(
        make_plan(2.0),
        requests(0, 1100, rate),
        replan=lambda d: other_plan(make_plan(), d.rates["w"]),
    )
    run.until(1100)
    first, second = run.of("replan")
    (hold,) = run.of("hold")
    assert 690 <= first.at <= 700
    assert first.at < hold.at < first.at + 300 and "minimum interval" in hold.detail
    assert second.at == pytest.approx(first.at + 300, abs=TICK)
    assert second.old_plan == first.new_plan and second.rates["w"] > 6
    assert [m for t, m in run.modes.items() if hold.at <= t < second.at] == ["holding"] * int(
        (second.at - hold.at) / TICK
    )


def test_a_change_by_someone_else_starts_the_interval() -> None:
    # an operator makes another plan current at t = 650 (`scepsy plan`): the doubling at 600
    # must then wait until 650 + 300 = 950
    plan = make_plan(2.0)
    theirs = other_plan(plan, 2.0)
    run = Run(plan, requests(0, 1000, rate_step(2.0, 4.0, 600)))
    run.until(645)
    run.plan = theirs
    run.until(1000, start=650)
    (decision,) = run.of("replan")
    assert decision.at == pytest.approx(950, abs=TICK) and decision.old_plan == theirs.id


def test_a_failed_replan_is_retried_after_retry_s_and_an_unchanged_one_waits() -> None:
    answers: list[Plan | str] = ["placement infeasible: no room", "again no room"]
    plan = make_plan(2.0)

    def replan(d: Decision) -> Plan | str:
        return answers.pop(0) if answers else plan  # then: the same plan

    run = Run(plan, requests(0, 1300, rate_step(2.0, 4.0, 600)), replan=replan).until(1300)
    first, second, third = run.of("replan")[:3]
    assert (first.outcome, second.outcome, third.outcome) == ("failed", "failed", "unchanged")
    assert "no room" in first.detail and first.new_plan is None
    assert second.at - first.at == pytest.approx(60) and third.at - second.at == pytest.approx(60)
    # an unchanged plan: the next try waits the minimum interval
    fourth = run.of("replan")[3]
    assert fourth.at - third.at == pytest.approx(300)


# ------------------------------------------------------------------------------ nodes
def test_node_loss_replaces_at_once_even_inside_the_interval() -> None:
    # the plan changed at t = 0 (created_at), so load changes wait until 300; n2 disappears
    # at t = 100 and is lost after the grace (15 s): re-placed at 115, spec unchanged
    plan = make_plan(2.0)
    assert {a.node for a in plan.placement.assignments} >= {"n2"}
    seen: list[Decision] = []

    def replan(d: Decision) -> Plan:
        seen.append(d)
        nodes = tuple(n for n in plan.nodes if n.name == "n1")
        return dataclasses.replace(other_plan(plan, 2.001), nodes=nodes)

    live = lambda t: ("n1", "n2") if t < 100 else ("n1",)  # noqa: E731
    run = Run(plan, requests(0, 200, lambda t: 2.0), live=live, replan=replan).until(200)
    (decision,) = run.of("replan")
    assert decision.at == 115.0
    (reason,) = decision.reasons
    assert (reason.kind, reason.subject) == ("node_lost", "n2")
    assert "engine(s) of the plan ran there" in reason.detail
    assert decision.rates == {} and seen[0].spec_text == plan.spec_text


def test_a_node_that_comes_back_within_the_grace_is_not_lost() -> None:
    live = lambda t: ("n1",) if 100 <= t < 110 else ("n1", "n2")  # noqa: E731
    run = Run(make_plan(2.0), requests(0, 300, lambda t: 2.0), live=live).until(300)
    assert run.decisions == []


def test_a_joined_node_waits_for_the_interval() -> None:
    # n3 joins at t = 50; after its grace (65) it is drift, but the plan is from t = 0: held
    # once, re-planned at 300
    live = lambda t: ("n1", "n2") if t < 50 else ("n1", "n2", "n3")  # noqa: E731
    run = Run(make_plan(2.0), requests(0, 400, lambda t: 2.0), live=live).until(400)
    (hold,) = run.of("hold")
    (decision,) = run.of("replan")
    assert hold.at == 65.0 and hold.reasons[0].kind == "node_joined"
    assert decision.at == 300.0 and decision.reasons[0].subject == "n3"


def test_unknown_nodes_keep_the_timers_and_no_nodes_holds_everything() -> None:
    # a tick without node information (Redis hiccup) neither loses nor finds nodes
    gone = lambda t: None if 100 <= t < 200 else ("n1", "n2")  # noqa: E731
    assert (
        Run(make_plan(2.0), requests(0, 300, lambda t: 2.0), live=gone).until(300).decisions == []
    )
    # no live node at all: nothing to plan on, the loop waits (even with drift)
    none = lambda t: ()  # noqa: E731
    run = Run(make_plan(2.0), requests(0, 900, rate_step(2.0, 4.0, 400)), live=none).until(900)
    assert run.decisions == [] and run.modes[900] == "no_live_nodes"


def test_a_plan_for_a_declared_cluster_is_not_managed() -> None:
    run = Run(make_plan(2.0, live=False), requests(0, 900, rate_step(2.0, 4.0, 400)))
    run.until(900)
    assert run.decisions == [] and set(run.modes.values()) == {"unmanaged"}


# --------------------------------------------------------------------------- operator
def test_a_pinned_plan_is_never_replaced() -> None:
    # rate doubling and a lost node, but the plan is pinned: one hold record per drift, never
    # a re-plan
    plan = make_plan(2.0)
    live = lambda t: ("n1", "n2") if t < 500 else ("n1",)  # noqa: E731
    run = Run(
        plan, requests(0, 900, rate_step(2.0, 4.0, 300)), live=live, pinned=lambda t: plan.id
    ).until(900)
    assert run.of("replan") == [] and run.plan is plan
    holds = run.of("hold")
    assert [h.reasons[-1].kind for h in holds] == ["rate_high", "node_lost"]
    assert all(f"plan {plan.id} is pinned" in h.detail for h in holds)


def test_paused_does_nothing_and_resume_starts_afresh() -> None:
    # paused until t = 1000 with drift from 600: no decision, no record; after resume the
    # drift must be sustained again (30 s): re-plan at 1030
    run = Run(
        make_plan(2.0),
        requests(0, 1200, rate_step(2.0, 4.0, 600)),
        live=lambda t: ("n1", "n2") if t < 700 else ("n1",),
        paused=lambda t: t < 1000,
    ).until(1200)
    assert {m for t, m in run.modes.items() if t < 1000} == {"paused"}
    # the lost node's grace restarts at resume too: 1015 comes first (a lost node is urgent);
    # the rate drift then waits for the interval after that change
    first, *rest = run.decisions
    assert first.at == 1015.0 and {r.kind for r in first.reasons} == {"node_lost"}
    assert first.action == "replan" and first.outcome == "changed"
    assert [(d.action, d.reasons[0].kind) for d in rest] == [("hold", "rate_high")]


# ---------------------------------------------------------------------------- shares
def test_shares_and_fanout_drift_replan_from_the_trace() -> None:
    # the baseline is taken at created_at 0 + settle 30 + window 120 = 150. At t = 600 every
    # request makes 4 calls to A instead of 2: A's share goes from 1.0/1.25 = 0.8 to
    # 2.0/2.25 = 0.89 (< 0.15: no share drift), its calls per request from 2 to 4 (fan-out
    # +100% > 30%), and the rate stays at 2 req/s. The window's n_A crosses 2.6 (+30%) once
    # 30% of its requests are new ones, at ~636; sustained: ~666.
    calls = requests(0, 600, lambda t: 2.0) + requests(600, 1000, lambda t: 2.0, tag="x", a_calls=4)
    run = Run(make_plan(2.0), calls).until(1000)
    (decision,) = run.of("replan")
    assert 660 <= decision.at <= 680
    (reason,) = decision.reasons
    assert reason.kind == "fanout" and re.match(r"A calls/request (2|1\.9\d) -> 3\.", reason.detail)
    assert decision.traced == ("w",) and decision.rates["w"] == pytest.approx(2.0, rel=0.05)


def test_share_drift() -> None:
    # B's calls take 1.5 s instead of 0.25 from t = 600: B's share goes 0.2 -> 1.5/2.5 = 0.6
    calls = requests(0, 600, lambda t: 2.0) + requests(600, 1000, lambda t: 2.0, tag="x", b_s=1.5)
    run = Run(make_plan(2.0), calls).until(1000)
    (decision,) = run.of("replan")
    assert decision.reasons[0].kind == "shares" and "B share 0.20 -> " in decision.reasons[0].detail


def test_latency_objective() -> None:
    config = dataclasses.replace(CONFIG, latency_objective_s=1.5)
    # requests take 2 x 0.5 + 0.25 = 1.25 s; from t = 400 A's calls take 1 s: 2.25 s > 1.5
    calls = requests(0, 400, lambda t: 2.0) + requests(400, 800, lambda t: 2.0, tag="x", a_s=1.0)
    run = Run(make_plan(2.0), calls, config=config).until(800)
    replans = run.of("replan")
    assert replans and replans[0].reasons[0].kind == "latency"


# ----------------------------------------------------------------------------- config
@pytest.mark.parametrize(
    "field_name, value",
    [("window_s", 0.0), ("rate_up", 1.0), ("rate_down", 1.2), ("min_requests", 0),
     ("sustain_s", -1.0)],
)  # fmt: skip
def test_config_errors_name_the_field(field_name: str, value: float) -> None:
    with pytest.raises(InvalidInputError, match=field_name):
        LoopConfig(**{field_name: value})
