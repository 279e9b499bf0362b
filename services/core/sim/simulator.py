"""The discrete-event workflow simulator.

``simulate(workflow, deployment, arrivals, ...)`` serves one request per arrival time: each runs the
workflow's program (``services.core.sim.program``); every LLM call is routed by the router's own
policy code (``services.core.routing``) to a replica of its model, which batches it with the other
calls on that replica (``services.core.perf.scheduler.BatchEngine``, the analytic performance
model of its model, GPU type, TP degree and GPU fraction); tool calls take their time and no GPU.

Determinism: request i runs with the random generator ``default_rng([seed, i])`` whatever the
deployment, and events at equal times are handled in the order they were scheduled, so the same
inputs give the same result. Calls handed to a replica at one instant (a fan-out, or the next call
of a program whose call just finished there) join the same iteration, as arrivals at or before
an iteration's start do in ``batching.simulate``.

Replicas come from a ``Deployment`` (an allocation per model). A ``Controller`` may change them
while the simulation runs: every ``interval`` seconds it sees a ``ClusterView`` and returns
``ScaleAction``s; a started replica takes GPUs from the pool at once and serves after
``engine_start_delay``; a stopped one takes no new calls and gives its GPUs back when its last
call finishes.

The result carries per-request spans and, with ``record=True``, the trace the router would record
(``services.core.workload.trace``), so statistics, the ALP and the planner run on it unchanged.
"""

from __future__ import annotations

import heapq
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from services.core.allocation import Allocation
from services.core.cluster.hardware import GpuSpec
from services.core.cluster.models import ModelSpec
from services.core.errors import InvalidInputError
from services.core.perf.model import FloatArray, PerfModel
from services.core.perf.scheduler import BatchEngine, SchedulerConfig
from services.core.routing import DEFAULT_POLICY, CallInfo, PolicyOptions, ReplicaLoad, make_policy
from services.core.sim.control import (
    ClusterView,
    Controller,
    ModelView,
    ReplicaView,
    ScaleAction,
    ScaleEvent,
)
from services.core.sim.program import Llm, LlmResult, Parallel, Program, Tool, ToolResult, Workflow
from services.core.workload.trace import TraceCall, TraceRequest


@dataclass(frozen=True, slots=True)
class Deployment:
    """What serves the workflow: ``allocation[m]`` replicas of ``models[m]`` on ``gpu``s."""

    gpu: GpuSpec
    models: Mapping[str, ModelSpec]  # deployment name -> architecture
    allocation: Mapping[str, Allocation]

    def __post_init__(self) -> None:
        missing = sorted(set(self.allocation) - set(self.models))
        if missing:
            raise InvalidInputError(f"deployment: no model architecture for {missing}")

    @property
    def gpus(self) -> float:
        return sum(a.gpus for a in self.allocation.values())


@dataclass(frozen=True, slots=True)
class SimOptions:
    """How the simulation runs. ``gpus`` is the cluster size a controller may grow into
    (default: the deployment's GPUs)."""

    seed: int = 0
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    routing: str = DEFAULT_POLICY
    routing_options: PolicyOptions = field(default_factory=PolicyOptions)
    record: bool = False
    engine_start_delay: float = 30.0
    gpus: float | None = None


@dataclass(frozen=True, slots=True)
class SimResult:
    """Per request (in arrival order): arrival and finish times; counters; the trace."""

    workflow: str
    arrival: FloatArray
    finish: FloatArray
    calls: int  # LLM calls served
    calls_by_model: dict[str, int]
    iterations: int  # engine iterations, all replicas
    preemptions: int
    end: float  # time of the last event
    trace: tuple[TraceCall, ...] = ()
    requests: tuple[TraceRequest, ...] = ()
    scaling: tuple[ScaleEvent, ...] = ()

    @property
    def latency(self) -> FloatArray:
        return self.finish - self.arrival


def simulate(
    workflow: Workflow,
    deployment: Deployment,
    arrivals: Sequence[float] | FloatArray,
    options: SimOptions | None = None,
    controller: Controller | None = None,
) -> SimResult:
    """Serve one request of ``workflow`` per arrival time (module docstring).

    Raises ``InvalidInputError`` when a program calls a model the deployment does not serve, or
    a call can never fit a replica's KV cache; ``InfeasibleError`` when a replica's model does
    not fit its memory share.
    """
    arr = np.asarray(arrivals, dtype=np.float64)
    if arr.size and (not np.all(np.isfinite(arr)) or np.any(np.diff(arr) < 0)):
        raise InvalidInputError("arrivals: must be finite and non-decreasing")
    run = _Run(workflow, deployment, arr, options or SimOptions(), controller)
    return run.execute()


# ------------------------------------------------------------------------------------ internals
_ARRIVAL, _WAKE, _TOOL, _READY, _TICK, _START = range(6)


class _Task:
    """A running program (or sub-program of a ``Parallel``)."""

    __slots__ = ("gen", "parent", "pending", "request", "results", "slot")

    def __init__(self, gen: Program, request: int, parent: _Task | None, slot: int) -> None:
        self.gen = gen
        self.request = request
        self.parent = parent
        self.slot = slot
        self.pending = 0
        self.results: list[Any] = []


class _Call:
    __slots__ = ("completion", "model", "prompt", "replica", "request", "slot", "start", "task")

    def __init__(self, step: Llm, replica: _Replica, task: _Task, slot: int, start: float) -> None:
        self.model = step.model
        self.prompt = step.prompt_tokens
        self.completion = step.completion_tokens
        self.replica = replica
        self.request = task.request
        self.start = start
        self.task = task
        self.slot = slot


class _Replica:
    __slots__ = ("allocation", "calls", "engine", "id", "model", "start_pending", "state", "weight")

    def __init__(self, model: str, rid: str, engine: BatchEngine, allocation: Allocation) -> None:
        self.model = model
        self.id = rid
        self.engine = engine
        self.allocation = allocation
        self.weight = allocation.tp * allocation.fraction
        self.calls: list[_Call | None] = []  # by engine call number; None once finished
        self.state = "ready"  # starting | ready | draining | stopped
        self.start_pending = False


class _Pool:
    """The replicas of one model and the routing bookkeeping."""

    __slots__ = ("allocation", "area", "calls", "last", "next_id", "outstanding", "replicas", "seq")

    def __init__(self, allocation: Allocation) -> None:
        self.allocation = allocation
        self.replicas: list[_Replica] = []
        self.next_id = 0
        self.seq = 0
        self.outstanding = 0
        self.area = 0.0  # integral of outstanding over time since the last view
        self.last = 0.0
        self.calls = 0

    def account(self, now: float, change: int) -> None:
        self.area += self.outstanding * (now - self.last)
        self.last = now
        self.outstanding += change


class _Run:
    """Mutable state of one simulation (private; ``simulate`` is the interface)."""

    def __init__(
        self,
        workflow: Workflow,
        deployment: Deployment,
        arrivals: FloatArray,
        options: SimOptions,
        controller: Controller | None,
    ) -> None:
        self.workflow = workflow
        # a workflow that assigns requests by their index (a stratified replay) says so
        self.program_at = getattr(workflow, "program_at", None)
        self.deployment = deployment
        self.arrivals = arrivals
        self.opt = options
        self.controller = controller
        self.policy = make_policy(options.routing, options.routing_options)
        self.heap: list[tuple[float, int, int, Any]] = []
        self.seq = 0
        self.now = 0.0
        self.finish = np.full(len(arrivals), np.nan)
        self.done = 0
        self.perfs: dict[tuple[str, int, float], PerfModel] = {}
        self.pools = {m: _Pool(a) for m, a in sorted(deployment.allocation.items())}
        self.free_gpus = (options.gpus if options.gpus is not None else deployment.gpus) - (
            deployment.gpus
        )
        self.trace: list[TraceCall] = []
        self.scaling: list[ScaleEvent] = []
        self.stopped: list[_Replica] = []
        for model, alloc in self.pools.items():
            for _ in range(alloc.allocation.replicas):
                self._add_replica(model, ready=True)

    # --- events ------------------------------------------------------------------------------

    def push(self, time: float, kind: int, payload: Any) -> None:
        self.seq += 1
        heapq.heappush(self.heap, (time, self.seq, kind, payload))

    def execute(self) -> SimResult:
        for i, t in enumerate(self.arrivals):
            self.push(float(t), _ARRIVAL, i)
        if self.controller is not None and len(self.arrivals):
            self.push(self.controller.interval, _TICK, self.controller.initial_state())
        handlers = (self._arrive, self._wake, self._tool, self._ready, self._tick, self._start)
        while self.heap and self.done < len(self.arrivals):
            self.now, _, kind, payload = heapq.heappop(self.heap)
            handlers[kind](payload)
        return self._result()

    def _arrive(self, index: int) -> None:
        rng = np.random.default_rng([self.opt.seed, index])
        at = self.program_at
        gen = self.workflow.program(rng) if at is None else at(index, rng)
        self._resume(_Task(gen, index, None, -1), None)

    def _wake(self, payload: tuple[_Replica, int]) -> None:
        rep, epoch = payload
        engine = rep.engine
        if engine.epoch != epoch or rep.state == "stopped":
            return  # superseded by a later wake-up
        for number in engine.finish_iteration(self.now):
            self._complete(rep, number)
        if not rep.start_pending:
            rep.start_pending = True
            self.push(self.now, _START, rep)
        if rep.state == "draining" and engine.outstanding == 0:
            self._stop(rep)

    def _tool(self, payload: tuple[_Task, int, ToolResult]) -> None:
        task, slot, result = payload
        self._deliver(task, slot, result)

    def _start(self, rep: _Replica) -> None:
        """Begin the replica's next iteration, with every call handed to it until now."""
        rep.start_pending = False
        engine = rep.engine
        epoch = engine.epoch
        engine.start_iteration(self.now)
        if engine.epoch != epoch and engine.wake is not None:
            self.push(engine.wake, _WAKE, (rep, engine.epoch))

    # --- programs ------------------------------------------------------------------------------

    def _resume(self, task: _Task, value: Any) -> None:
        while True:
            try:
                step = task.gen.send(value)
            except StopIteration as stop:
                self._end(task, stop.value)
                return
            if isinstance(step, Llm):
                self._call(step, task, -1)
                return
            if isinstance(step, Tool):
                self._start_tool(step, task, -1)
                return
            if not isinstance(step, Parallel):
                raise InvalidInputError(
                    f"workflow {self.workflow.name}: a program yielded {step!r}, "
                    "not an Llm, Tool or Parallel"
                )
            if not step.branches:
                value = ()
                continue
            task.pending = len(step.branches)
            task.results = [None] * task.pending
            for slot, branch in enumerate(step.branches):
                if isinstance(branch, Llm):
                    self._call(branch, task, slot)
                elif isinstance(branch, Tool):
                    self._start_tool(branch, task, slot)
                else:
                    self._resume(_Task(branch, task.request, task, slot), None)
            return

    def _deliver(self, task: _Task, slot: int, value: Any) -> None:
        if slot < 0:
            self._resume(task, value)
            return
        task.results[slot] = value
        task.pending -= 1
        if task.pending == 0:
            results, task.results = tuple(task.results), []
            self._resume(task, results)

    def _end(self, task: _Task, value: Any) -> None:
        if task.parent is not None:
            self._deliver(task.parent, task.slot, value)
            return
        self.finish[task.request] = self.now
        self.done += 1

    def _start_tool(self, step: Tool, task: _Task, slot: int) -> None:
        if not step.seconds >= 0:
            raise InvalidInputError(f"tool {step.name}: seconds must be >= 0, got {step.seconds}")
        result = ToolResult(step.name, self.now, self.now + step.seconds)
        self.push(self.now + step.seconds, _TOOL, (task, slot, result))

    # --- LLM calls -----------------------------------------------------------------------------

    def _call(self, step: Llm, task: _Task, slot: int) -> None:
        pool = self.pools.get(step.model)
        if pool is None:
            raise InvalidInputError(
                f"workflow {self.workflow.name}: calls model {step.model!r}, which the "
                f"deployment does not serve ({', '.join(self.pools)})"
            )
        rep = self._route(pool, task.request)
        engine = rep.engine
        epoch = engine.epoch
        number = engine.submit(self.now, step.prompt_tokens, step.completion_tokens, start=False)
        if engine.wake is None and not rep.start_pending:
            # an idle engine starts once every call of this instant has reached it
            rep.start_pending = True
            self.push(self.now, _START, rep)
        rep.calls.append(_Call(step, rep, task, slot, self.now))
        assert len(rep.calls) == number + 1
        pool.account(self.now, +1)
        pool.calls += 1
        if engine.epoch != epoch and engine.wake is not None:
            self.push(engine.wake, _WAKE, (rep, engine.epoch))

    def _route(self, pool: _Pool, request: int) -> _Replica:
        ready = [r for r in pool.replicas if r.state == "ready"]
        assert ready, "a model always keeps a ready replica (see _apply)"
        if len(ready) == 1:
            pool.seq += 1
            return ready[0]
        loads = [ReplicaLoad(r.id, r.engine.outstanding, r.weight) for r in ready]
        chosen = self.policy.choose(loads, CallInfo(pool.seq, str(request)))
        pool.seq += 1
        return next(r for r in ready if r.id == chosen)

    def _complete(self, rep: _Replica, number: int) -> None:
        call = rep.calls[number]
        assert call is not None
        engine = rep.engine
        end = engine.finish[number]
        ttft = engine.first_token[number] - call.start
        pool = self.pools[rep.model]
        pool.account(self.now, -1)
        name = f"{rep.model}/{rep.id}"
        if self.opt.record:
            self.trace.append(
                TraceCall(
                    workflow=self.workflow.name,
                    request_id=f"r{call.request}",
                    call_id=f"c{len(self.trace)}",
                    model=rep.model,
                    start=call.start,
                    end=end,
                    prompt_tokens=call.prompt,
                    completion_tokens=call.completion,
                    ttft=ttft,
                    replica=name,
                )
            )
        result = LlmResult(call.model, call.prompt, call.completion, call.start, end, ttft, name)
        rep.calls[number] = None  # lets the program state go
        self._deliver(call.task, call.slot, result)

    # --- replicas and the controller -------------------------------------------------------------

    def _perf(self, model: str, alloc: Allocation) -> PerfModel:
        key = (model, alloc.tp, alloc.fraction)
        found = self.perfs.get(key)
        if found is None:
            spec = self.deployment.models[model]
            found = PerfModel.create(spec, self.deployment.gpu, alloc.tp, alloc.fraction)
            self.perfs[key] = found
        return found

    def _add_replica(self, model: str, *, ready: bool) -> _Replica:
        pool = self.pools[model]
        alloc = pool.allocation
        engine = BatchEngine(self._perf(model, alloc), self.opt.scheduler)
        rep = _Replica(model, str(pool.next_id), engine, alloc)
        pool.next_id += 1
        pool.replicas.append(rep)
        if not ready:
            rep.state = "starting"
            self.free_gpus -= alloc.tp * alloc.fraction
            self.scaling.append(ScaleEvent(self.now, model, rep.id, "start"))
            self.push(self.now + self.opt.engine_start_delay, _READY, rep)
        return rep

    def _ready(self, rep: _Replica) -> None:
        if rep.state == "starting":
            rep.state = "ready"
            self.scaling.append(ScaleEvent(self.now, rep.model, rep.id, "ready"))

    def _drain(self, rep: _Replica) -> None:
        rep.state = "draining"
        self.scaling.append(ScaleEvent(self.now, rep.model, rep.id, "drain"))
        if rep.engine.outstanding == 0:
            self._stop(rep)

    def _stop(self, rep: _Replica) -> None:
        rep.state = "stopped"
        self.pools[rep.model].replicas.remove(rep)
        self.stopped.append(rep)
        self.free_gpus += rep.weight
        self.scaling.append(ScaleEvent(self.now, rep.model, rep.id, "stop"))

    def _tick(self, state: Any) -> None:
        assert self.controller is not None
        actions, state = self.controller.decide(self._view(), state)
        for action in actions:
            self._apply(action)
        self.push(self.now + self.controller.interval, _TICK, state)

    def _view(self) -> ClusterView:
        models: list[ModelView] = []
        for model, pool in self.pools.items():
            pool.account(self.now, 0)
            span = self.controller.interval if self.controller is not None else 1.0
            replicas = tuple(
                ReplicaView(r.id, r.engine.outstanding, r.state == "ready")
                for r in pool.replicas
                if r.state in ("ready", "starting")
            )
            models.append(ModelView(model, pool.allocation, replicas, pool.area / span, pool.calls))
            pool.area, pool.calls = 0.0, 0
        return ClusterView(self.now, self.free_gpus, tuple(models))

    def _apply(self, action: ScaleAction) -> None:
        pool = self.pools.get(action.model)
        if pool is None:
            raise InvalidInputError(f"controller: no model {action.model!r}")
        alloc = pool.allocation
        for _ in range(max(action.delta, 0)):
            if self.free_gpus + 1e-9 < alloc.tp * alloc.fraction:
                break
            self._add_replica(action.model, ready=False)
        for _ in range(max(-action.delta, 0)):
            # the replica with the least work (a starting one, or the newest among equals)
            # stops taking calls, unless it is the last ready one
            live = [r for r in pool.replicas if r.state in ("ready", "starting")]
            ready = [r for r in live if r.state == "ready"]
            victim = min(reversed(live), key=lambda r: (r.state == "ready", r.engine.outstanding))
            if len(live) <= 1 or (victim.state == "ready" and len(ready) <= 1):
                break
            self._drain(victim)

    # --- result --------------------------------------------------------------------------------

    def _result(self) -> SimResult:
        replicas = [r for p in self.pools.values() for r in p.replicas] + self.stopped
        by_model: dict[str, int] = {}
        for r in replicas:
            by_model[r.model] = by_model.get(r.model, 0) + len(r.calls)
        if self.done < len(self.arrivals):
            raise InvalidInputError(
                f"simulate: {len(self.arrivals) - self.done} requests never finished"
            )
        requests: tuple[TraceRequest, ...] = ()
        if self.opt.record:
            requests = tuple(
                TraceRequest(self.workflow.name, f"r{i}", float(a), float(f))
                for i, (a, f) in enumerate(zip(self.arrivals, self.finish, strict=True))
            )
        return SimResult(
            workflow=self.workflow.name,
            arrival=self.arrivals,
            finish=self.finish,
            calls=sum(by_model.values()),
            calls_by_model=dict(sorted(by_model.items())),
            iterations=sum(r.engine.iterations for r in replicas),
            preemptions=sum(r.engine.preemptions for r in replicas),
            end=self.now,
            trace=tuple(self.trace),
            requests=requests,
            scaling=tuple(self.scaling),
        )
