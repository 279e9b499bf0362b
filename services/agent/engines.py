"""The node agent's engines: it makes the vLLM engines on its node match the current plan.

Declarative and idempotent, the way a kubelet runs pods. ``EngineManager.want(plan)`` sets what
the plan asks of this node (``services.core.serving.intended_engines``); one loop (``step`` every
``tick_s``, or at once when the plan changes) moves each engine along its lifecycle::

    STARTING --/health answers--> (registered as a router endpoint) READY
    READY --no longer intended--> (deregistered first) DRAINING --idle or drain_timeout_s--> STOPPED
    STARTING --exits or not healthy in start_timeout_s--> FAILED (the tail of its log kept)
    READY --process exits--> (deregistered) STARTING again after a backoff, restarts + 1

A failed engine is not retried until the plan asks for a different engine (a new id). New engines
start before old ones stop where the GPUs allow: an engine no longer intended keeps serving until
every intended engine of its model (on any node, read from the agents' records in Redis) is READY
or FAILED, or until it stands in the way of an intended engine of this node. On GPU hosts engines
that share a GPU start one at a time (vLLM sizes its memory from what is free when it starts).

The agent writes what it started to ``<engine_dir>/engines.json`` (id, PID, port). An agent that
crashed and comes back adopts the engines of that file that still run and are still intended, and
stops the others: nothing orphaned, nothing doubled. On SIGTERM it drains and stops its engines.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import aiohttp

from protos.scepsy.v1 import types_pb2 as pb
from services.agent.config import AgentConfig
from services.core.cluster.hardware import GIB
from services.core.cluster.inventory import NodeInventory, Source
from services.core.errors import ConfigError, NotFoundError, UnavailableError
from services.core.planning.plan import Plan
from services.core.routing import Endpoint
from services.core.serving import EngineIntent, Occupant, blockers, intended_engines
from services.runtime.convert import assignment_to_pb
from services.runtime.engines import (
    LocalEngine,
    free_ports,
    log_tail,
    port_is_free,
    process_group_alive,
    vllm_executable,
)
from services.runtime.launch import LaunchHost, MpsDaemon, device_of, engine_spec
from services.runtime.logging import get_logger
from services.runtime.store import Store

log = get_logger(__name__)

S = pb.EngineState
LIVE = (S.ENGINE_STATE_STARTING, S.ENGINE_STATE_READY, S.ENGINE_STATE_DRAINING)
STATE_FILE = "engines.json"
PORTS_PER_NODE = 64
FORGET_AFTER_S = 300.0  # stopped and failed engines stay listed this long
MAX_BACKOFF_S = 60.0


class EngineProcess(Protocol):
    """A running engine process: one this agent started, or one it adopted after a restart."""

    @property
    def pid(self) -> int | None: ...

    def running(self) -> bool: ...

    def exit_code(self) -> int | None: ...

    def terminate(self) -> None: ...

    def stop(self, grace_s: float = 15.0) -> None: ...


class AdoptedEngine:
    """An engine started by an earlier run of this agent: known by its PID (its process group)."""

    def __init__(self, pid: int) -> None:
        self._pid = pid

    @property
    def pid(self) -> int | None:
        return self._pid

    def running(self) -> bool:
        return bool(process_group_alive(self._pid))

    def exit_code(self) -> int | None:
        return None  # not our child: its code is not ours to read

    def terminate(self) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self._pid, signal.SIGTERM)

    def stop(self, grace_s: float = 15.0) -> None:
        self.terminate()
        deadline = time.monotonic() + grace_s
        while process_group_alive(self._pid) and time.monotonic() < deadline:
            time.sleep(0.1)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self._pid, signal.SIGKILL)


def _is_engine(pid: int) -> bool:
    """Whether ``pid`` runs and leads a process group that looks like a ``vllm serve``."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False
    return b"vllm" in cmdline and bool(process_group_alive(pid))


@dataclass
class Managed:
    """One engine this agent runs or ran."""

    intent: EngineIntent
    plan_id: str
    port: int = 0
    url: str = ""
    log_path: str = ""
    state: int = S.ENGINE_STATE_STARTING
    process: EngineProcess | None = None
    restarts: int = 0
    last_error: str = ""
    started_at: float = 0.0
    updated_at: float = 0.0
    cpus: tuple[int, ...] = ()
    cpu_slot: int = 0
    registered: bool = False
    start_deadline: float = 0.0  # monotonic
    next_start: float = 0.0  # monotonic: backoff after a crash
    drain_since: float = 0.0  # monotonic
    stopping: asyncio.Task[None] | None = field(default=None, repr=False)

    @property
    def id(self) -> str:
        return self.intent.id

    @property
    def occupant(self) -> Occupant:
        i = self.intent
        return Occupant(i.id, i.model, i.replica, i.assignment)

    def to_pb(self, node: str) -> pb.Engine:
        return pb.Engine(
            id=self.id,
            model=self.intent.model,
            node=node,
            endpoint=self.url,
            state=self.state,  # type: ignore[arg-type]
            assignment=assignment_to_pb(self.intent.assignment),
            served_name=self.intent.serving.served_name,
            pid=(self.process.pid or 0) if self.process is not None else 0,
            restarts=self.restarts,
            last_error=self.last_error,
            log_path=self.log_path,
            started_at=self.started_at,
            updated_at=self.updated_at,
            weight=self.intent.weight,
            plan_id=self.plan_id,
            cpus=list(self.cpus),
        )


@dataclass(frozen=True)
class EngineSettings:
    """How the agent runs engines (from ``AgentConfig``)."""

    node: str
    host: LaunchHost
    advertise_host: str
    engine_dir: Path
    vllm: Path
    port_base: int = 0  # 0: free ports
    start_timeout_s: float = 600.0
    drain_timeout_s: float = 30.0
    min_drain_s: float = 1.0  # the router sees a deregistration within this
    stop_grace_s: float = 15.0
    tick_s: float = 1.0
    records_ttl_s: float = 10.0
    mps_control: str = "nvidia-cuda-mps-control"


class EngineManager:
    def __init__(
        self,
        settings: EngineSettings,
        store: Store,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._s = settings
        self._store = store
        self._clock = clock
        self._engines: dict[str, Managed] = {}
        self._intended: dict[str, EngineIntent] = {}  # this node's
        self._plan_intents: tuple[EngineIntent, ...] = ()  # every node's
        self._wanted_at = 0.0
        self._plan_id = ""
        self._plan_known = False
        self._adoptable: dict[str, dict[str, object]] = {}
        self._wake = asyncio.Event()
        self._loop: asyncio.Task[None] | None = None
        self._session: aiohttp.ClientSession | None = None
        self._mps = (
            MpsDaemon(settings.host.mps_pipe_dir, settings.host.mps_log_dir, settings.mps_control)
            if settings.host.device == "cuda"
            else None
        )
        self.steps = 0
        self._stopping = False

    # ------------------------------------------------------------------ public
    @property
    def plan_id(self) -> str:
        return self._plan_id

    def engines(self) -> list[pb.Engine]:
        return [self._engines[i].to_pb(self._s.node) for i in sorted(self._engines)]

    def want(self, plan: Plan | None) -> None:
        """Make ``plan`` (None: no plan) the one this node's engines follow."""
        plan_id = plan.id if plan is not None else ""
        intents = intended_engines(plan, self._s.node) if plan is not None else ()
        changed = plan_id != self._plan_id or not self._plan_known
        self._plan_id = plan_id
        self._plan_known = True
        self._intended = {e.id: e for e in intents}
        self._plan_intents = intended_engines(plan) if plan is not None else ()
        if changed:
            self._wanted_at = time.monotonic()
        for engine in self._engines.values():
            if engine.id in self._intended:  # kept: its replica number may be new
                engine.intent = self._intended[engine.id]
                engine.plan_id = plan_id
        if changed:
            log.info(
                "engines_wanted", node=self._s.node, plan=plan_id, engines=sorted(self._intended)
            )
        self._wake.set()

    async def start(self) -> None:
        self._s.engine_dir.mkdir(parents=True, exist_ok=True)
        self._session = aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=2.0), trust_env=False
        )
        self._adoptable = self._read_state()
        self._loop = asyncio.create_task(self._run(), name="agent-engines")

    async def stop(self) -> None:
        """Drain every engine (deregister, wait for in-flight calls, bounded), stop them all."""
        self._stopping = True
        if self._loop is not None:
            self._loop.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._loop
        live = [e for e in self._engines.values() if e.state in LIVE and e.process is not None]
        for engine in live:
            await self._deregister(engine)
        deadline = time.monotonic() + self._s.drain_timeout_s
        if live:
            await asyncio.sleep(self._s.min_drain_s)
        while time.monotonic() < deadline:
            busy = [await self._busy(e) for e in live]
            if not any(busy):
                break
            await asyncio.sleep(0.2)
        for engine in live:
            if engine.process is not None:
                engine.process.terminate()
        await asyncio.gather(
            *(asyncio.to_thread(self._stop_process, e) for e in live), return_exceptions=True
        )
        for engine in live:
            self._set(engine, S.ENGINE_STATE_STOPPED)
        for info in self._adoptable.values():  # never resolved against a plan: stop them too
            await asyncio.to_thread(AdoptedEngine(int(str(info["pid"]))).stop, 5.0)
        self._write_state()
        with contextlib.suppress(UnavailableError):
            await self._store.remove_engines(self._s.node)
        if self._mps is not None:
            await asyncio.to_thread(self._mps.stop)
        if self._session is not None:
            await self._session.close()
        log.info("engines_stopped", node=self._s.node, engines=[e.id for e in live])

    async def publish(self) -> None:
        """Write the records to Redis and re-register READY engines whose endpoint is gone (a
        Redis that came back empty). Called on every heartbeat; Redis errors propagate."""
        if self._stopping:
            return  # draining everything: nothing to re-register
        await self._store.put_engines(self._s.node, self.engines(), self._s.records_ttl_s)
        ready = [e for e in self._engines.values() if e.state == S.ENGINE_STATE_READY]
        if not ready:
            return
        present = {(ep.model, ep.replica) for ep in await self._store.list_endpoints()}
        for engine in ready:
            if (engine.intent.serving.served_name, engine.id) not in present:
                await self._store.put_endpoint(self._endpoint(engine))
                log.info("engine_reregistered", engine=engine.id)

    # ------------------------------------------------------------------ loop
    async def _run(self) -> None:
        while True:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self._s.tick_s)
            self._wake.clear()
            try:
                await self.step()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # one bad step must not end reconciling
                log.exception("engines_step_failed", error=str(exc))

    async def step(self) -> None:
        """One reconcile pass (module docstring)."""
        self.steps += 1
        if not self._plan_known:
            return  # nothing is decided before the current plan has been read once
        before = self._snapshot()
        if self._adoptable:
            self._adopt()
        for engine in list(self._engines.values()):
            await self._watch(engine)
        await self._retire()
        await self._launch_intended()
        self._forget()
        if self._snapshot() != before:
            self._write_state()
            with contextlib.suppress(UnavailableError):
                await self._store.put_engines(self._s.node, self.engines(), self._s.records_ttl_s)

    def _snapshot(self) -> list[tuple[str, int, int]]:
        return [(e.id, e.state, e.restarts) for e in self._engines.values()]

    async def _watch(self, engine: Managed) -> None:
        now = time.monotonic()
        if engine.stopping is not None:
            if engine.stopping.done():
                engine.stopping = None
                self._set(engine, S.ENGINE_STATE_STOPPED)
            return
        process = engine.process
        if engine.state == S.ENGINE_STATE_STARTING and process is None:
            return  # waiting for its turn or its backoff
        if engine.state not in LIVE or process is None:
            return
        if not process.running():
            await self._exited(engine, process)
            return
        if engine.state == S.ENGINE_STATE_STARTING:
            if await self._healthy(engine):
                try:
                    await self._store.put_endpoint(self._endpoint(engine))
                except UnavailableError as exc:
                    log.warning("engine_register_failed", engine=engine.id, error=str(exc))
                    return
                engine.registered = True
                self._set(engine, S.ENGINE_STATE_READY)
                log.info("engine_ready", engine=engine.id, url=engine.url)
            elif now > engine.start_deadline:
                self._fail(
                    engine,
                    f"not healthy within {self._s.start_timeout_s:g} s",
                )
                engine.stopping = asyncio.create_task(asyncio.to_thread(self._stop_process, engine))
        elif engine.state == S.ENGINE_STATE_DRAINING:
            waited = now - engine.drain_since
            if waited >= self._s.min_drain_s and (
                waited >= self._s.drain_timeout_s or not await self._busy(engine)
            ):
                engine.stopping = asyncio.create_task(asyncio.to_thread(self._stop_process, engine))

    async def _exited(self, engine: Managed, process: EngineProcess) -> None:
        code = process.exit_code()
        await self._deregister(engine)
        engine.process = None
        how = f"exited with code {code}" if code is not None else "exited"
        tail = log_tail(Path(engine.log_path), 20)
        if engine.state == S.ENGINE_STATE_DRAINING:
            self._set(engine, S.ENGINE_STATE_STOPPED)
        elif engine.state == S.ENGINE_STATE_READY and engine.id in self._intended:
            engine.restarts += 1
            backoff = min(MAX_BACKOFF_S, 2.0 ** (engine.restarts - 1))
            engine.next_start = time.monotonic() + backoff
            engine.last_error = f"{how}; restart {engine.restarts} in {backoff:g} s\n{tail}"
            self._set(engine, S.ENGINE_STATE_STARTING)
            log.warning("engine_crashed", engine=engine.id, code=code, restarts=engine.restarts)
        elif engine.state == S.ENGINE_STATE_READY:
            self._set(engine, S.ENGINE_STATE_STOPPED)
        else:
            self._fail(engine, f"{how} before becoming healthy\n{tail}")

    async def _retire(self) -> None:
        """Drain engines no longer intended once their model's new engines are settled, or at
        once when they stand in the way of an intended engine of this node."""
        retiring = [
            e
            for e in self._engines.values()
            if e.id not in self._intended and e.state in LIVE and e.stopping is None
        ]
        if not retiring:
            return
        pending = [i for i in self._intended.values() if not self._is_settled_here(i.id)]
        in_the_way = {
            o.id
            for intent in pending
            if intent.id not in self._engines or self._engines[intent.id].process is None
            for o in blockers(intent, [e.occupant for e in retiring])
        }
        settled = await self._settled_models({e.intent.model for e in retiring})
        for engine in retiring:
            if engine.state == S.ENGINE_STATE_DRAINING:
                continue
            if engine.state == S.ENGINE_STATE_STARTING or engine.process is None:
                # not serving yet (or waiting to restart): nothing to drain
                if engine.process is not None:
                    engine.stopping = asyncio.create_task(
                        asyncio.to_thread(self._stop_process, engine)
                    )
                else:
                    self._set(engine, S.ENGINE_STATE_STOPPED)
                continue
            if engine.id in in_the_way or engine.intent.model in settled:
                await self._deregister(engine)
                engine.drain_since = time.monotonic()
                self._set(engine, S.ENGINE_STATE_DRAINING)
                log.info("engine_draining", engine=engine.id)

    def _is_settled_here(self, engine_id: str) -> bool:
        engine = self._engines.get(engine_id)
        return engine is not None and engine.state in (
            S.ENGINE_STATE_READY,
            S.ENGINE_STATE_FAILED,
        )

    async def _settled_models(self, models: set[str]) -> set[str]:
        """Models whose intended engines, on every node of the plan, are all READY or FAILED
        (other nodes' states from their agents' records in Redis). After ``start_timeout_s``
        without that (an agent gone, Redis down), every model counts as settled."""
        if time.monotonic() - self._wanted_at > self._s.start_timeout_s:
            return set(models)
        states = {e.id: e.state for e in self._engines.values()}
        if any(i.node != self._s.node for i in self._plan_intents if i.model in models):
            try:
                records = await self._store.list_engines()
            except UnavailableError:
                return set()
            for record in records:
                if record.node != self._s.node:
                    states[record.id] = record.state
        done = (S.ENGINE_STATE_READY, S.ENGINE_STATE_FAILED)
        return {
            model
            for model in models
            if all(states.get(i.id) in done for i in self._plan_intents if i.model == model)
        }

    async def _launch_intended(self) -> None:
        occupants = [
            e.occupant for e in self._engines.values() if e.state in LIVE and e.process is not None
        ]
        starting_gpus = {
            g
            for e in self._engines.values()
            if e.state == S.ENGINE_STATE_STARTING and e.process is not None
            for g in e.intent.assignment.gpus
        }
        if self._mps is not None:
            shared = any(i.shares_gpus for i in self._intended.values()) or any(
                e.intent.shares_gpus for e in self._engines.values() if e.state in LIVE
            )
            try:
                if shared != self._mps.running:
                    await asyncio.to_thread(self._mps.start if shared else self._mps.stop)
            except UnavailableError as exc:
                for intent in self._intended.values():
                    if intent.shares_gpus and intent.id not in self._engines:
                        self._engines[intent.id] = Managed(intent, self._plan_id)
                        self._fail(self._engines[intent.id], str(exc))
                return
        now = time.monotonic()
        for intent in sorted(self._intended.values(), key=lambda i: i.id):
            engine = self._engines.get(intent.id)
            if engine is None or (
                engine.state == S.ENGINE_STATE_STOPPED and engine.stopping is None
            ):  # new, or stopped by an earlier plan and wanted again: a fresh engine
                engine = Managed(intent, self._plan_id)
                self._engines[intent.id] = engine
            if engine.state != S.ENGINE_STATE_STARTING or engine.process is not None:
                continue
            if engine.next_start > now or blockers(intent, occupants):
                continue
            gpu_host = self._s.host.device == "cuda"
            if gpu_host and intent.shares_gpus and set(intent.assignment.gpus) & starting_gpus:
                continue  # one at a time on a shared GPU: vLLM reads free memory at start
            self._launch(engine, occupants)
            occupants.append(engine.occupant)
            starting_gpus.update(intent.assignment.gpus)

    def _launch(self, engine: Managed, occupants: Sequence[Occupant]) -> None:
        intent = engine.intent
        if not engine.port:
            engine.port = self._port()
        engine.cpu_slot = self._cpu_slot(intent, occupants)
        spec = engine_spec(intent, self._s.host, engine.port, engine.cpu_slot)
        engine.cpus = spec.cpus or ()
        engine.log_path = str(self._s.engine_dir / f"{intent.id}.log")
        process = LocalEngine(spec, Path(engine.log_path), vllm=self._s.vllm)
        try:
            process.start()
        except OSError as exc:
            self._fail(engine, f"cannot start {self._s.vllm}: {exc}")
            return
        engine.process = process
        engine.url = f"http://{self._s.advertise_host}:{engine.port}"
        engine.started_at = self._clock()
        engine.start_deadline = time.monotonic() + self._s.start_timeout_s
        engine.registered = False
        self._set(engine, S.ENGINE_STATE_STARTING)
        log.info(
            "engine_starting",
            engine=intent.id,
            pid=process.pid,
            port=engine.port,
            gpus=list(intent.assignment.gpus),
            cpus=list(engine.cpus),
            restarts=engine.restarts,
        )

    def _port(self) -> int:
        used = {e.port for e in self._engines.values() if e.state in LIVE}
        if not self._s.port_base:
            while True:
                port = free_ports(1, self._s.host.engine_host)[0]
                if port not in used:
                    return port
        for port in range(self._s.port_base, self._s.port_base + PORTS_PER_NODE):
            if port not in used and port_is_free(port, self._s.host.engine_host):
                return port
        raise UnavailableError(
            f"engine_port_base: no free port in {self._s.port_base}.."
            f"{self._s.port_base + PORTS_PER_NODE - 1}"
        )

    def _cpu_slot(self, intent: EngineIntent, occupants: Sequence[Occupant]) -> int:
        """The lowest unit offset on its first device that no live engine there uses."""
        if self._s.host.device != "cpu":
            return 0
        device = intent.assignment.gpus[0]
        taken: set[int] = set()
        for o in occupants:
            other = self._engines.get(o.id)
            if other is not None and device in o.assignment.gpus and o.id != intent.id:
                taken.update(range(other.cpu_slot, other.cpu_slot + o.assignment.units))
        units = intent.assignment.units
        for slot in range(intent.fraction_unit - units + 1):
            if not taken & set(range(slot, slot + units)):
                return slot
        return 0

    def _forget(self) -> None:
        now = self._clock()
        for engine_id, engine in list(self._engines.items()):
            if (
                engine.state in (S.ENGINE_STATE_STOPPED, S.ENGINE_STATE_FAILED)
                and engine_id not in self._intended
                and now - engine.updated_at > FORGET_AFTER_S
            ):
                del self._engines[engine_id]

    # ------------------------------------------------------------------ adoption
    def _read_state(self) -> dict[str, dict[str, object]]:
        path = self._s.engine_dir / STATE_FILE
        try:
            doc = json.loads(path.read_text())
            entries = doc["engines"]
        except (OSError, ValueError, KeyError, TypeError):
            return {}
        alive: dict[str, dict[str, object]] = {}
        for entry in entries:
            try:
                pid = int(entry["pid"])
                alive_now = _is_engine(pid)
            except (KeyError, TypeError, ValueError):
                continue
            if alive_now:
                alive[str(entry["id"])] = entry
        log.info("engines_found", node=self._s.node, running=sorted(alive))
        return alive

    def _adopt(self) -> None:
        """Resolve the engines found at start against the plan: adopt the intended, stop the
        rest."""
        for engine_id, info in self._adoptable.items():
            pid = int(str(info["pid"]))
            intent = self._intended.get(engine_id)
            if intent is None or engine_id in self._engines:
                log.info("engine_orphan_stopped", engine=engine_id, pid=pid)
                AdoptedEngine(pid).stop(self._s.stop_grace_s)
                continue
            engine = Managed(intent, self._plan_id)
            engine.process = AdoptedEngine(pid)
            engine.port = int(str(info.get("port", 0)))
            engine.url = str(info.get("url", ""))
            engine.log_path = str(info.get("log", ""))
            engine.restarts = int(str(info.get("restarts", 0)))
            engine.started_at = float(str(info.get("started_at", 0.0)))
            engine.cpu_slot = int(str(info.get("cpu_slot", 0)))
            cpus = info.get("cpus", [])
            engine.cpus = tuple(int(c) for c in cpus) if isinstance(cpus, list) else ()
            engine.start_deadline = time.monotonic() + self._s.start_timeout_s
            self._engines[engine_id] = engine
            self._set(engine, S.ENGINE_STATE_STARTING)
            log.info("engine_adopted", engine=engine_id, pid=pid)
        self._adoptable = {}

    def _write_state(self) -> None:
        entries: list[dict[str, object]] = [
            {
                "id": e.id,
                "pid": e.process.pid,
                "port": e.port,
                "url": e.url,
                "log": e.log_path,
                "restarts": e.restarts,
                "started_at": e.started_at,
                "cpu_slot": e.cpu_slot,
                "cpus": list(e.cpus),
            }
            for e in self._engines.values()
            if e.process is not None and e.state in LIVE
        ]
        entries += list(self._adoptable.values())
        path = self._s.engine_dir / STATE_FILE
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"node": self._s.node, "engines": entries}))
        tmp.replace(path)

    # ------------------------------------------------------------------ helpers
    def _set(self, engine: Managed, state: int) -> None:
        engine.state = state
        engine.updated_at = self._clock()

    def _fail(self, engine: Managed, error: str) -> None:
        engine.last_error = error
        self._set(engine, S.ENGINE_STATE_FAILED)
        log.error("engine_failed", engine=engine.id, error=error.splitlines()[0])

    def _endpoint(self, engine: Managed) -> Endpoint:
        return Endpoint(
            engine.intent.serving.served_name, engine.id, engine.url, engine.intent.weight
        )

    async def _deregister(self, engine: Managed) -> None:
        if not engine.registered:
            return
        try:
            await self._store.remove_endpoint(engine.intent.serving.served_name, engine.id)
        except UnavailableError as exc:
            log.warning("engine_deregister_failed", engine=engine.id, error=str(exc))
            return
        engine.registered = False

    def _stop_process(self, engine: Managed) -> None:
        if engine.process is not None:
            engine.process.stop(self._s.stop_grace_s)

    async def _get(self, engine: Managed, path: str) -> tuple[int, str]:
        assert self._session is not None
        local = f"http://{self._s.host.engine_host}:{engine.port}"
        if self._s.host.engine_host in ("0.0.0.0", "::", ""):
            local = f"http://127.0.0.1:{engine.port}"
        async with self._session.get(local + path) as reply:
            return reply.status, await reply.text()

    async def _healthy(self, engine: Managed) -> bool:
        try:
            status, _ = await self._get(engine, "/health")
        except (TimeoutError, aiohttp.ClientError, OSError):
            return False
        return status == 200

    async def _busy(self, engine: Managed) -> bool:
        """Whether the engine still has calls running or waiting (its Prometheus gauges)."""
        try:
            status, text = await self._get(engine, "/metrics")
        except (TimeoutError, aiohttp.ClientError, OSError):
            return False  # not answering: nothing more to wait for
        if status != 200:
            return False
        for line in text.splitlines():
            if line.startswith(("vllm:num_requests_running", "vllm:num_requests_waiting")):
                with contextlib.suppress(ValueError):
                    if float(line.rsplit(" ", 1)[1]) > 0:
                        return True
        return False


def engine_manager(config: AgentConfig, node: NodeInventory, store: Store) -> EngineManager | None:
    """The agent's engine manager, or None when engines are off (module docstring of config:
    ``auto`` runs them on a ``cpu`` node or on real GPUs, not on declared GPUs that are not here).
    """
    gpu_type = node.gpus[0].gpu_type if node.gpus else ""
    device = device_of(gpu_type)
    if config.engines == "off" or not node.gpus:
        return None
    if config.engines == "auto" and device == "cuda" and node.source is not Source.NVML:
        log.info("engines_off", node=node.name, why="declared GPUs that are not here")
        return None
    vllm = _vllm_command(config.vllm)
    home = Path(os.environ.get("SCEPSY_HOME", ".scepsy")).resolve()
    engine_dir = Path(config.engine_dir) if config.engine_dir else home / "engines" / node.name
    host = LaunchHost(
        device=device,
        engine_host=config.engine_host,
        cpus=tuple(sorted(os.sched_getaffinity(0))),
        devices=len(node.gpus),
        device_memory_gib=node.gpus[0].memory_total_bytes / GIB,
        mps_pipe_dir=config.mps_pipe_dir,
        mps_log_dir=config.mps_log_dir,
    )
    settings = EngineSettings(
        node=node.name,
        host=host,
        advertise_host=config.advertise_host or config.engine_host,
        engine_dir=engine_dir.resolve(),
        vllm=vllm,
        port_base=config.engine_port_base,
        start_timeout_s=config.engine_start_timeout_s,
        drain_timeout_s=config.engine_drain_timeout_s,
        records_ttl_s=config.node_ttl_s,
        mps_control=config.mps_control,
    )
    return EngineManager(settings, store)


def _vllm_command(configured: str) -> Path:
    if configured:
        found = shutil.which(configured)
        if found is None:
            raise ConfigError(f"vllm: {configured!r} is not an executable command")
        return Path(found)
    try:
        return vllm_executable()
    except NotFoundError:
        found = shutil.which("vllm")
        if found is None:
            raise ConfigError(
                "vllm: no vllm command: run `make engine-venv`, set SCEPSY_ENGINE_VENV or "
                "SCEPSY_VLLM, or run the agent with --engines off"
            ) from None
        return Path(found)
