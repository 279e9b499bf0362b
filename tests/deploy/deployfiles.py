"""Run what the deploy files describe as local processes: the command a container would run (the
image's ENTRYPOINT plus the compose ``command`` or the pod's ``args``) with the environment it
would get (the image's ENV, then the compose ``environment`` or the pod's ``env``).

Only what a container runtime or Kubernetes provides is stood in for, never the deploy files'
own settings: each container's ports become free loopback ports (every container has its own
network namespace, so all of them use 50051 there), the names of other services become
127.0.0.1 with their mapped port, paths inside a container (volumes, secrets, the image's home)
become temporary directories holding the same files, and the downward API's node name and pod IP
are given. Nothing here knows the deploy files' settings.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import grpc

from protos.scepsy.v1 import planner_pb2, planner_pb2_grpc
from services.cli.suite import health, log_tail
from services.runtime.redis_server import free_port

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
SCEPSY = Path(sys.executable).parent / "scepsy"


@dataclass(frozen=True)
class Image:
    """What a Dockerfile's final stage gives every container: ENTRYPOINT, CMD and ENV."""

    entrypoint: tuple[str, ...]
    cmd: tuple[str, ...]
    env: dict[str, str]


def read_image(dockerfile: Path) -> Image:
    """ENTRYPOINT, CMD and ENV of the last stage (exec form; ENV values referring to another
    variable, such as PATH=/opt/scepsy/bin:$PATH, are the runtime's business and left out)."""
    text = re.sub(r"\\\n", " ", dockerfile.read_text())
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    last_from = max(i for i, line in enumerate(lines) if line.upper().startswith("FROM "))
    entrypoint: tuple[str, ...] = ()
    cmd: tuple[str, ...] = ()
    env: dict[str, str] = {}
    for line in lines[last_from:]:
        word, _, rest = line.partition(" ")
        if word.upper() == "ENTRYPOINT":
            entrypoint = tuple(json.loads(rest))
        elif word.upper() == "CMD":
            cmd = tuple(json.loads(rest))
        elif word.upper() == "ENV":
            for pair in shlex.split(rest):
                name, _, value = pair.partition("=")
                if "$" not in value:
                    env[name] = value
    return Image(entrypoint, cmd, env)


def read_env_file(path: Path) -> dict[str, str]:
    """KEY=VALUE lines of a compose env file (comments and blank lines skipped)."""
    found = {}
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if line and not line.startswith("#"):
            name, _, value = line.partition("=")
            found[name.strip()] = value.strip().strip('"').strip("'")
    return found


_VARIABLE = re.compile(r"\$\$|\$\{(?P<name>\w+)(?:(?P<op>:?[-?])(?P<arg>[^}]*))?\}")


def interpolate(value: object, env: Mapping[str, str]) -> object:
    """Compose interpolation of every string in ``value``: ${VAR}, ${VAR:-default},
    ${VAR-default}, ${VAR:?error}, ${VAR?error}, and $$ for a literal $."""
    if isinstance(value, dict):
        return {k: interpolate(v, env) for k, v in value.items()}
    if isinstance(value, list):
        return [interpolate(v, env) for v in value]
    if not isinstance(value, str):
        return value

    def one(match: re.Match[str]) -> str:
        if match.group(0) == "$$":
            return "$"
        name, op, arg = match.group("name"), match.group("op"), match.group("arg")
        given = env.get(name)
        unset = given is None or (op is not None and op.startswith(":") and given == "")
        if op and op.endswith("?") and unset:
            raise KeyError(f"{name}: {arg}")
        if op and op.endswith("-") and unset:
            return str(arg)
        return given or ""

    return _VARIABLE.sub(one, value)


@dataclass
class Container:
    """One container to run as a process: its name (a compose service, or a pod), the hosts
    it is reached by (service names), its argv and environment as the deploy file gives them."""

    name: str
    hosts: tuple[str, ...]
    argv: list[str]
    env: dict[str, str]
    ports: dict[int, int] = field(default_factory=dict)  # container port -> local port
    local_env: dict[str, str] = field(default_factory=dict)  # env with everything mapped
    paths: dict[str, Path] = field(default_factory=dict)  # its own mounts: inside -> local
    port_names: dict[str, int] = field(default_factory=dict)  # Kubernetes named ports

    def local_port(self, target: int | str) -> int:
        """The local port of a container port, given by number or by name."""
        return self.ports[self.port_names[target] if isinstance(target, str) else target]

    health_port: int = 0  # container port of its gRPC health check


class Local:
    """Maps a deployment's network and file system onto this host, and runs its containers."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.addresses: dict[tuple[str, int], str] = {}  # (host, port) -> "127.0.0.1:P"
        self.paths: dict[str, Path] = {}  # path in a container -> local path
        self.processes: dict[str, subprocess.Popen[bytes]] = {}
        self.logs: dict[str, Path] = {}

    def map_ports(self, container: Container, ports: Iterable[int]) -> None:
        for port in ports:
            container.ports[port] = free_port()
            for host in container.hosts:
                self.addresses[host, port] = f"127.0.0.1:{container.ports[port]}"

    def map_address(self, host: str, port: int, local: str) -> None:
        self.addresses[host, port] = local

    def map_path(self, inside: str, local: Path) -> None:
        self.paths[inside.rstrip("/")] = local

    def localize(self, container: Container) -> list[str]:
        """The argv and environment of ``container`` with addresses, ports and paths mapped."""
        hosts = sorted({h for h, _ in self.addresses}, key=len, reverse=True)
        pattern = re.compile(r"(?<![\w.-])(" + "|".join(map(re.escape, hosts)) + r"):(\d+)\b")

        def address(match: re.Match[str]) -> str:
            return self.addresses.get((match.group(1), int(match.group(2))), match.group(0))

        def one(value: str, in_env: bool = False) -> str:
            if value.isdigit() and int(value) in container.ports:  # a port it listens on
                return str(container.ports[int(value)])
            if in_env and value in hosts:  # a bare service name (an advertised host)
                return "127.0.0.1"
            value = pattern.sub(address, value) if hosts else value
            paths = {**self.paths, **container.paths}
            for inside in sorted(paths, key=len, reverse=True):
                if value == inside or value.startswith(inside + "/"):
                    return str(paths[inside]) + value[len(inside) :]
            return value

        container.local_env = {k: one(v, in_env=True) for k, v in container.env.items()}
        return [one(a) for a in container.argv]

    def start(self, container: Container) -> None:
        argv = self.localize(container)
        if argv and argv[0] == "scepsy":  # the image's entry point, installed here too
            argv[0] = str(SCEPSY)
        log = self.root / f"{container.name}.log"
        self.logs[container.name] = log
        with open(log, "wb") as out:
            self.processes[container.name] = subprocess.Popen(
                argv,
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                cwd=self.root,
                env={**_host_env(), **container.local_env},
                start_new_session=True,
            )

    async def wait_serving(self, containers: Iterable[Container], timeout_s: float = 60) -> None:
        """Until the gRPC health check of each of ``containers`` answers SERVING."""
        pending = list(containers)
        deadline = time.monotonic() + timeout_s
        while pending:
            for c in pending:
                if (code := self.processes[c.name].poll()) is not None:
                    raise AssertionError(
                        f"{c.name} exited with {code}:\n{log_tail(self.logs[c.name])}"
                    )
            states = await asyncio.gather(
                *(health(f"127.0.0.1:{c.ports[c.health_port]}", 1.0) for c in pending)
            )
            pending = [c for c, s in zip(pending, states, strict=True) if s != "SERVING"]
            if pending and time.monotonic() > deadline:
                raise AssertionError(
                    f"{pending[0].name} not serving in {timeout_s} s:\n"
                    f"{log_tail(self.logs[pending[0].name])}"
                )
            await asyncio.sleep(0.1)

    def stop(self) -> dict[str, int]:
        """SIGTERM every process (as a container runtime does), wait; their exit statuses."""
        for process in self.processes.values():
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        codes = {}
        for name, process in self.processes.items():
            try:
                codes[name] = process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                codes[name] = process.wait()
        return codes


def _host_env() -> dict[str, str]:
    """This host's environment without Scepsy settings: a container starts from its image's."""
    return {k: v for k, v in os.environ.items() if not k.startswith(("SCEPSY_", "REDIS_URL"))}


def write_cluster(path: Path, node_names: Iterable[str]) -> Path:
    """A declared cluster of one 8x H100 node per name (an agent without GPUs reports it)."""
    nodes = "".join(
        f"  - {{name: {n}, gpu_type: H100-SXM, gpus: 8, interconnect: nvswitch}}\n"
        for n in node_names
    )
    path.write_text(f"version: 1\nnodes:\n{nodes}")
    return path


async def plan(address: str, spec_yaml: str) -> planner_pb2.Plan:
    """A plan of ``spec_yaml`` from the Planner at ``address`` (which calls the Profiler and
    the Placer it was pointed at, on the live nodes)."""
    async with grpc.aio.insecure_channel(address) as channel:
        request = planner_pb2.PlanRequest(spec_yaml=spec_yaml, dry_run=True)
        response = await planner_pb2_grpc.PlannerStub(channel).Plan(request, timeout=60)
    return response.plan
