"""The control loop's I/O: the planner re-plans on its own when load or nodes drift (issue 12).

Every ``loop_interval_s`` the loop reads what arrived in the router's trace stream since its
cursor (at start: the last ``loop_window_s`` seconds), the live nodes, the current plan and the
operator's pause and pin from Redis, and hands them to the pure decision
(``services.core.control.decide.step``). When that says re-plan, it plans the decision's spec
through the planner's own plan path (``Planner.plan``: live nodes, the current placement as the
running one, so few engines move) as a dry run, checks that nobody changed the current plan,
paused or pinned meanwhile, and makes the new plan current (``plan_changed``: the node agents
reconcile their engines from it). Every decision is stored in Redis (a capped list), and the
loop's view (statistics per workflow, drifts, mode) after every tick (with a TTL, so a stopped
loop shows none): ``scepsy loop status|decisions``.

Trace times are the router's clock and the window is the planner's: hosts are assumed to keep
their clocks synchronised (NTP); a skew is an error of that size at the window's edges.

Metrics (``LoopMetrics``, served beside the planner's): ``scepsy_planner_loop_ticks_total`` by
``result`` (``led``, ``followed``: another planner holds the lease, ``skipped``: Redis error,
``failed``: an unexpected error, logged with its traceback),
``scepsy_planner_loop_decisions_total`` by ``action`` and ``outcome``,
``scepsy_planner_loop_tick_seconds``.

One planner process runs the loop at a time: each tick renews a lease in Redis, and a planner
without it only serves plans. A tick that meets a Redis error is skipped (logged once, and
again when Redis answers); the cursor stays, so nothing written meanwhile is missed while the
stream holds it. Trace lines that do not parse are skipped and counted.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import time
import uuid
from collections.abc import Callable, Sequence
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram
from redis.exceptions import RedisError

from services.core.control.decide import (
    Decision,
    LoopConfig,
    Observation,
    Tick,
    decision_dict,
    finished,
    initial_state,
    step,
)
from services.core.control.window import Record, window_dict
from services.core.errors import InvalidInputError, ScepsyError, UnavailableError
from services.core.planning.plan import Plan
from services.core.workload.trace import parse_trace_lines
from services.planner.config import PlannerConfig
from services.planner.service import Planner
from services.runtime.logging import get_logger
from services.runtime.periodic import Periodic
from services.runtime.server import Server
from services.runtime.store import Store

log = get_logger(__name__)

TRACE_PAGE = 5_000  # stream entries read per Redis call
MAX_PAGES = 20  # per tick; the rest is read on the next tick


TICK_BUCKETS = (0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class LoopMetrics:
    """The control loop's figures (module docstring), one registry per loop."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.ticks = Counter(
            "scepsy_planner_loop_ticks",
            "Control loop ticks, by result (led, followed, skipped)",
            ["result"],
            registry=self.registry,
        )
        self.decisions = Counter(
            "scepsy_planner_loop_decisions",
            "Control loop decisions, by action and outcome",
            ["action", "outcome"],
            registry=self.registry,
        )
        self.tick_seconds = Histogram(
            "scepsy_planner_loop_tick_seconds",
            "Time of one tick that led, a re-plan included",
            buckets=TICK_BUCKETS,
            registry=self.registry,
        )


class ControlLoop:
    def __init__(
        self,
        config: PlannerConfig,
        store: Store,
        planner: Planner,
        clock: Callable[[], float] = time.time,
        holder: str = "",
    ) -> None:
        self.metrics = LoopMetrics()
        self._config: LoopConfig = config.loop_config()
        self._interval_s = config.loop_interval_s
        self._kept = config.loop_decisions_kept
        self._store = store
        self._planner = planner
        self._clock = clock
        self._state = initial_state(self._config)
        self._cursor = ""
        self._holder = holder or f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self._periodic = Periodic(self._run, config.loop_interval_s, "planner-control-loop")
        self._down = False
        self.leader = False
        self.skipped_lines = 0  # trace lines that did not parse
        self.last: Tick | None = None

    @property
    def lease_s(self) -> float:
        return max(3 * self._interval_s, 15.0)

    async def start(self, _server: Server | None = None) -> None:
        self._periodic.start()

    async def stop(self, _server: Server | None = None) -> None:
        await self._periodic.stop()
        if self.leader:
            with contextlib.suppress(UnavailableError, RedisError):  # else it expires
                await self._store.release_loop_lease(self._holder)

    async def _run(self) -> None:
        try:
            await self.tick()
        except Exception as exc:  # a bug in one tick must not end the loop: log it, go on
            self.metrics.ticks.labels("failed").inc()
            log.exception("loop_tick_failed", error=repr(exc))

    async def tick(self) -> Decision | None:
        """One tick (module docstring); the decision made, if any. Never raises for Redis."""
        began = time.perf_counter()
        try:
            decision = await self._tick()
        except (UnavailableError, RedisError) as exc:
            self.metrics.ticks.labels("skipped").inc()
            if not self._down:
                self._down = True
                log.warning("loop_store_down", error=str(exc))
            return None
        if self.leader:
            self.metrics.ticks.labels("led").inc()
            self.metrics.tick_seconds.observe(time.perf_counter() - began)
        else:
            self.metrics.ticks.labels("followed").inc()
        if self._down:
            self._down = False
            log.info("loop_store_up")
        return decision

    async def _tick(self) -> Decision | None:
        now = self._clock()
        leader = await self._store.hold_loop_lease(self._holder, self.lease_s)
        if leader != self.leader:
            self.leader = leader
            log.info("loop_leader" if leader else "loop_follower", holder=self._holder)
        if not leader:
            return None
        control = await self._store.loop_control()
        records = await self._read_trace(now)
        live = tuple(n.name for n in await self._store.list_nodes())
        plan = await self._store.get_current_plan()
        observation = Observation(
            now, records, plan, live, paused=control["paused"], pinned=control["pinned"]
        )
        # the statistics take a while on a busy window: keep the event loop serving
        tick = await asyncio.to_thread(step, self._state, observation, self._config)
        self._state, self.last = tick.state, tick
        decision = tick.decision
        if decision is not None and decision.action == "replan" and plan is not None:
            decision = await self._replan(decision, plan)
        if decision is not None:
            self.metrics.decisions.labels(decision.action, decision.outcome).inc()
            await self._store.put_loop_decision(decision_dict(decision), self._kept)
            log.info(
                "loop_decision",
                action=decision.action,
                outcome=decision.outcome,
                old_plan=decision.old_plan,
                new_plan=decision.new_plan,
                reasons=[f"{r.kind} {r.subject}" for r in decision.reasons],
                detail=decision.detail,
            )
        await self._store.put_loop_status(self.status(tick, control, now), self.lease_s)
        return decision

    async def _replan(self, decision: Decision, old: Plan) -> Decision:
        """Plan the decision's spec (a dry run), then make it current unless something changed
        meanwhile; the decision with its outcome."""
        new: Plan | None = None
        error = ""
        try:
            new = await self._planner.plan(
                decision.spec_text, "", self._config.window_s, dry_run=True
            )
            if new.id != old.id:
                control = await self._store.loop_control()
                current = await self._store.current_plan_id()
                if control["paused"] or control["pinned"] or current != old.id:
                    error = (
                        f"not applied: while planning, the current plan became {current} "
                        f"(paused {control['paused']}, pinned {control['pinned']}); new plan "
                        f"{new.id} stored"
                    )
                    new = None
                else:
                    await self._planner.set_current(new.id)
        except (UnavailableError, RedisError):
            raise
        except ScepsyError as exc:
            new, error = None, f"{type(exc).__name__}: {exc}"
        self._state, done = finished(
            self._state, decision, self._clock(), self._config, old, new, error
        )
        return done

    async def _read_trace(self, now: float) -> tuple[Record, ...]:
        if not self._cursor:  # from the start of the window
            self._cursor = f"{max(0, int((now - self._config.window_s) * 1000))}-0"
        records: list[Record] = []
        for _ in range(MAX_PAGES):
            page = await self._store.read_trace(self._cursor, TRACE_PAGE)
            if not page:
                break
            for _, line in page:
                records.extend(self._parse(line))
            self._cursor = page[-1][0]
            if len(page) < TRACE_PAGE:
                break
        return tuple(records)

    def _parse(self, line: str) -> Sequence[Record]:
        try:
            trace = parse_trace_lines([line], source="router trace")
        except InvalidInputError:
            self.skipped_lines += 1
            return ()
        return (*trace.calls, *trace.requests)

    def status(self, tick: Tick, control: dict[str, Any], now: float) -> dict[str, Any]:
        """The loop's view for ``scepsy loop status`` (JSON-ready)."""
        return {
            "at": now,
            "holder": self._holder,
            "mode": tick.mode,
            "plan": self._state.plan_id,
            "paused": control["paused"],
            "pinned": control["pinned"],
            "window_s": self._config.window_s,
            "interval_s": self._interval_s,
            "workflows": window_dict(tick.view),
            "drifts": [
                {"kind": d.kind, "subject": d.subject, "detail": d.detail, "since": since}
                for d, since in tick.drifts
            ],
            "next_change_at": tick.next_change_at
            if tick.next_change_at is not None and tick.next_change_at > now
            else None,
            "skipped_lines": self.skipped_lines,
        }
