"""The service processes of one host's suite: start them, wait until each serves, stop them.

``launch`` starts ``python -m services.<role>`` with flags in a session of its own, its output in
``<state dir>/<name>.log``. ``wait_ready`` polls until each launched process has announced
itself in Redis (``Store.list_services``, matched by name and PID; see
``services.runtime.registration``) and its gRPC health check answers SERVING, each check with a
deadline; a process that exits first, or is not there by the deadline, fails the wait with the
tail of its log. ``health`` is the one gRPC health check (``scepsy status`` uses it too);
``stop_pids`` the one way to stop processes (SIGTERM, a bounded wait, then SIGKILL).
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.core.errors import UnavailableError
from services.runtime import channels
from services.runtime.store import ServiceRecord, Store

LOG_TAIL_CHARS = 1500


@dataclass
class Launched:
    """One started service process; ``record`` is its announcement once it serves."""

    name: str  # unique in the suite: "planner", "agent/h100-0"
    role: str  # the service, ``python -m services.<role>``
    process: subprocess.Popen[bytes]
    log: Path
    extra: dict[str, str] = field(default_factory=dict)  # e.g. {"node": "h100-0"}
    record: ServiceRecord | None = None

    @property
    def pid(self) -> int:
        return self.process.pid

    def failure(self, why: str) -> UnavailableError:
        tail = log_tail(self.log)
        return UnavailableError(f"{self.name} {why}; last lines of {self.log}:\n{tail}")


def launch(
    home: Path,
    name: str,
    role: str,
    flags: Sequence[str],
    env: Mapping[str, str] | None = None,
    **extra: str,
) -> Launched:
    """Start ``python -m services.<role> flags`` with ``env`` added to this environment."""
    log_path = home / f"{name.replace('/', '-')}.log"
    with open(log_path, "wb") as log:  # this run's output only: its tail explains a failure
        process = subprocess.Popen(
            [sys.executable, "-m", f"services.{role}", *flags],
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
            env={**os.environ, **(env or {})},
        )
    return Launched(name, role, process, log_path, dict(extra))


def log_tail(path: Path, chars: int = LOG_TAIL_CHARS) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError as exc:
        return f"(no log: {exc.strerror})"
    return text[-chars:].rstrip() or "(empty)"


async def health(address: str, timeout_s: float) -> str:
    """The server's overall health: ``SERVING``, ``NOT_SERVING``, ... or, when the check itself
    fails, the name of its gRPC code (``UNAVAILABLE``, ``DEADLINE_EXCEEDED``)."""
    async with channels.aio_channel(address) as channel:
        try:
            reply = await health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=""), timeout=timeout_s
            )
        except grpc.aio.AioRpcError as exc:
            return str(exc.code().name)
    return str(health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status))


async def wait_ready(
    store: Store,
    launched: Sequence[Launched],
    deadline: float,
    nodes: Iterable[str] = (),
    watch: Sequence[Launched] = (),
    check_timeout_s: float = 1.0,
) -> None:
    """Until each of ``launched`` is announced and SERVING (``record`` set) and every node of
    ``nodes`` is registered, by ``deadline`` (``time.monotonic``). Raises ``UnavailableError``
    naming the first process (of ``launched`` and ``watch``) that exited, or that is not ready in
    time, with its log tail."""
    pending = [p for p in launched if p.record is None]
    missing_nodes = set(nodes)
    host = socket.gethostname()
    while True:
        for p in [*pending, *watch]:
            code = p.process.poll()
            if code is not None:
                raise p.failure(f"exited with status {code}")
        announced = {(r.name, r.pid): r for r in await store.list_services() if r.host == host}
        found = [(p, announced[p.role, p.pid]) for p in pending if (p.role, p.pid) in announced]
        timeout = max(0.05, min(check_timeout_s, deadline - time.monotonic()))
        states = await asyncio.gather(*(health(r.address, timeout) for _, r in found))
        for (p, record), state in zip(found, states, strict=True):
            if state == "SERVING":
                p.record = record
        pending = [p for p in pending if p.record is None]
        if missing_nodes:
            missing_nodes -= {n.name for n in await store.list_nodes()}
        if not pending and not missing_nodes:
            return
        if time.monotonic() > deadline:
            if pending:
                raise pending[0].failure("is not serving in time")
            raise UnavailableError(f"nodes not registered in time: {sorted(missing_nodes)}")
        await asyncio.sleep(0.05)


def alive(pid: int) -> bool:
    """True while the process runs (a zombie, left when nobody reaps it, counts as gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, IndexError):
        return False
    except OSError:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        return True


def stop_pids(pids: Iterable[int], timeout_s: float = 10.0) -> None:
    """SIGTERM every process of ``pids`` at once, wait up to ``timeout_s`` for all of them to
    end, SIGKILL those left, and wait until they are gone."""
    running = [pid for pid in pids if _signal(pid, signal.SIGTERM)]
    deadline = time.monotonic() + timeout_s
    while (running := [p for p in running if alive(p)]) and time.monotonic() < deadline:
        time.sleep(0.02)
    for pid in running:
        _signal(pid, signal.SIGKILL)
    deadline = time.monotonic() + 5.0  # SIGKILL cannot be refused; this bounds a slow kernel
    while any(alive(p) for p in running) and time.monotonic() < deadline:
        time.sleep(0.02)


def _signal(pid: int, sig: signal.Signals) -> bool:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        return False
    return True
