"""``scepsy up``, ``scepsy down``, ``scepsy nodes``: one host's suite and its inventory.

``up`` starts an embedded Redis (unless ``--redis-url``, ``SCEPSY_REDIS_URL`` or ``REDIS_URL`` names
one, see ``given_redis_url``), then the whole
suite, each service its own process (``services.cli.suite``): the node agents (one NVML agent
for this host, or one per node of a declared cluster file), the profiler, the placer and the
router, and once the profiler and placer serve, the planner, pointed at them
(``--profiler-address``, ``--placer-address``). Every service binds free ports and announces
its addresses in Redis; ``up`` waits until each one answers gRPC health SERVING (``--timeout``
in all). When one exits or does not get there, ``up`` stops everything it started, prints that
service's log tail and exits 2.

What ``up`` started is recorded in ``<state dir>/state.json`` (``$SCEPSY_HOME``, default
``./.scepsy``; mode 0600: it holds the Redis URL, password included), read with ``read_state()``::

    {"redis": {"url": "redis://127.0.0.1:6379/0", "embedded": true, "namespace": "scepsy"},
     "processes": [{"role": "redis", "pid": 1, "log": "..."},
                   {"role": "agent", "node": "h100-0", "pid": 2, "log": "..."}, ...],
     "services": {"planner": {"address": "127.0.0.1:40001", "metrics_address": "...",
                              "pid": 5, "log": "..."},
                  "router": {..., "http_address": "127.0.0.1:40007"},
                  "agent/h100-0": {..., "node": "h100-0"}, ...}}

What ``up`` prints shows the Redis URL without its password (``services.runtime.redis_url``).
``processes`` is everything to stop, in start order; ``services`` has one entry per service
process once it serves (the profiler, placer, planner, router, and ``agent/<node>``). ``down``
stops the services (SIGTERM, a bounded wait, SIGKILL), then Redis, and removes the file.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import time
from pathlib import Path
from typing import Any

from services.cli.store_args import add_store_flags, with_store
from services.cli.suite import Launched, alive, launch, stop_pids, wait_ready
from services.core.cluster.declared import load_cluster
from services.core.cluster.hardware import GIB
from services.core.cluster.inventory import NodeInventory
from services.core.errors import InvalidInputError, UnavailableError
from services.runtime.config import read_password_file
from services.runtime.redis_server import PASSWORD_FILE, RedisServer, with_password
from services.runtime.redis_url import checked, redact
from services.runtime.store import Store

__all__ = ["alive", "given_redis_url", "read_state", "resolve_redis_url", "state_dir"]

HOST = "127.0.0.1"


def register(sub: Any) -> None:
    up = sub.add_parser("up", help="start Redis and the whole suite on this host")
    up.add_argument("--cluster", help="declared cluster YAML: one agent per node (GPU-less hosts)")
    up.add_argument(
        "--redis-url",
        help="use this Redis instead of an embedded one (env SCEPSY_REDIS_URL, else REDIS_URL)",
    )
    up.add_argument(
        "--namespace",
        default=os.environ.get("SCEPSY_NAMESPACE", "scepsy"),
        help="Redis key namespace of the suite (env SCEPSY_NAMESPACE; default scepsy)",
    )
    up.add_argument("--http-port", type=int, default=0, help="router HTTP port (0: a free one)")
    up.add_argument("--router-port", type=int, default=0, help="router gRPC port (0: a free one)")
    up.add_argument(
        "--timeout", type=float, default=60.0, help="seconds for every service to serve"
    )
    up.add_argument("--json", action="store_true", help="print what was started as JSON")
    up.set_defaults(func=cmd_up)

    down = sub.add_parser("down", help="stop what `scepsy up` started")
    down.add_argument(
        "--timeout",
        type=float,
        default=60.0,
        help="seconds a process gets before SIGKILL (60: agents drain and stop their engines)",
    )
    down.set_defaults(func=cmd_down)

    nodes = sub.add_parser("nodes", help="list the cluster's nodes, GPUs and NVLink domains")
    add_store_flags(nodes)
    nodes.add_argument("--json", action="store_true", help="print JSON instead of a table")
    nodes.set_defaults(func=cmd_nodes)


# ---------------------------------------------------------------------------------------- state
def state_dir() -> Path:
    return Path(os.environ.get("SCEPSY_HOME", ".scepsy")).resolve()


def _state_path() -> Path:
    return state_dir() / "state.json"


def read_state() -> dict[str, Any] | None:
    """What ``scepsy up`` started here (module docstring), or None when nothing is up."""
    path = _state_path()
    if not path.exists():
        return None
    state: dict[str, Any] = json.loads(path.read_text())
    return state


def _write_state(state: dict[str, Any]) -> None:
    tmp = _state_path().with_suffix(".tmp")
    tmp.unlink(missing_ok=True)  # O_CREAT keeps the mode of a file that exists
    # 0600: the Redis URL in it may hold a password
    with os.fdopen(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "w") as out:
        out.write(json.dumps(state, indent=1))
    tmp.replace(_state_path())  # readers never see half a file


def given_redis_url(flag: str | None) -> str | None:
    """The Redis URL the user gave: ``--redis-url``, else ``SCEPSY_REDIS_URL``, else
    ``REDIS_URL``; None when none is set. ``ConfigError`` when it cannot be a Redis URL."""
    url = flag or os.environ.get("SCEPSY_REDIS_URL") or os.environ.get("REDIS_URL")
    return checked(url) if url else None


def resolve_redis_url(flag: str | None) -> str:
    """The one rule of every command: the URL the user gave (``given_redis_url``), else the Redis
    of the suite ``scepsy up`` started here; never a default that may be someone else's Redis."""
    url = given_redis_url(flag)
    if url:
        return url
    state = read_state()
    if state is None:
        raise UnavailableError(
            "no Redis given and no cluster is up here: pass --redis-url, set SCEPSY_REDIS_URL "
            "or REDIS_URL, or run `scepsy up` first"
        )
    url = str(state["redis"]["url"])
    if state["redis"].get("embedded"):
        password = read_password_file(str(state_dir() / PASSWORD_FILE))
        if password:
            url = with_password(url, password)
    return url


# ---------------------------------------------------------------------------------------- up
def cmd_up(args: argparse.Namespace) -> int:
    state = read_state()
    if state is not None and any(alive(p["pid"]) for p in state["processes"]):
        raise InvalidInputError(f"already up (state in {_state_path()}); run `scepsy down` first")
    t0 = time.monotonic()
    # validate everything before starting anything
    for flag, value in (("--http-port", args.http_port), ("--router-port", args.router_port)):
        if not 0 <= value <= 65535:
            raise InvalidInputError(f"{flag}: must be in 0..65535, got {value}")
    if args.timeout <= 0:
        raise InvalidInputError(f"--timeout: must be > 0, got {args.timeout}")
    if args.cluster:
        names = [n.name for n in load_cluster(args.cluster)]
        cluster_flags = ["--cluster", str(Path(args.cluster).resolve())]
    else:
        names = [socket.gethostname()]
        cluster_flags = []
    home = state_dir()
    home.mkdir(parents=True, exist_ok=True)
    given = given_redis_url(args.redis_url)
    redis_state = {"url": given or "", "embedded": given is None, "namespace": args.namespace}
    processes: list[dict[str, Any]] = []
    if given is None:
        # persistent (append-only file in home) and locked (ACL user, password file 0600)
        redis = RedisServer.embedded(home).start()
        assert redis.process is not None
        # the state file holds the URL without the password: commands read that from the
        # password file (resolve_redis_url)
        redis_state["url"] = redis.public_url
        processes.append(
            {"role": "redis", "pid": redis.process.pid, "log": str(home / "redis.log")}
        )
    url = redis.url if given is None else str(redis_state["url"])
    suite = _Suite(home, url, args.namespace, redis_state, processes)
    try:
        suite.start(args, names, cluster_flags, deadline=t0 + args.timeout)
    except BaseException:
        stop_pids(p["pid"] for p in processes if p["role"] != "redis")
        stop_pids(p["pid"] for p in processes if p["role"] == "redis")
        _state_path().unlink(missing_ok=True)
        raise
    elapsed = time.monotonic() - t0
    services = suite.services()
    if args.json:
        doc = {
            "redis_url": redact(redis_state["url"]),
            "redis": {**redis_state, "url": redact(redis_state["url"])},
            "nodes": names,
            "processes": processes,
            "services": services,
            "seconds": elapsed,
        }
        print(json.dumps(doc))
    else:
        embedded = " (embedded)" if redis_state["embedded"] else ""
        width = max(len(name) for name in services)
        print(f"{'redis':<{width}}  {redact(redis_state['url'])}{embedded}")
        for name, s in services.items():
            http = f"  http {s['http_address']}" if "http_address" in s else ""
            print(
                f"{name:<{width}}  grpc {s['address']}{http}  metrics {s['metrics_address']}  "
                f"pid {s['pid']}"
            )
        print(f"router: http://{services['router']['http_address']}/v1 (OpenAI-compatible)")
        print(f"all {len(services)} services serving in {elapsed:.2f}s; state in {_state_path()}")
    return 0


class _Suite:
    """The service processes of one ``up``, recorded in the state file as they start."""

    def __init__(
        self,
        home: Path,
        url: str,
        namespace: str,
        redis_state: dict[str, Any],
        processes: list[dict[str, Any]],
    ) -> None:
        self._home = home
        self._url = url
        self._namespace = namespace
        self._redis_state = redis_state
        self._processes = processes
        self._launched: list[Launched] = []

    def start(
        self, args: argparse.Namespace, names: list[str], cluster_flags: list[str], deadline: float
    ) -> None:
        agents = [
            self._launch(f"agent/{n}", "agent", [*cluster_flags, "--node-name", n], node=n)
            for n in names
        ]
        profiler = self._launch("profiler", "profiler", [])
        placer = self._launch("placer", "placer", [])
        router = self._launch(
            "router",
            "router",
            ["--port", str(args.router_port), "--http-port", str(args.http_port)],
        )

        async def wait() -> None:
            store = Store.connect(self._url, namespace=self._namespace)
            try:
                await wait_ready(store, [profiler, placer], deadline, watch=self._launched)
                self._save()
                assert profiler.record is not None and placer.record is not None
                planner = self._launch(
                    "planner",
                    "planner",
                    [
                        "--profiler-address",
                        profiler.record.address,
                        "--placer-address",
                        placer.record.address,
                    ],
                )
                await wait_ready(store, [*agents, router, planner], deadline, nodes=names)
            finally:
                self._save()
                await store.close()

        asyncio.run(wait())

    def services(self) -> dict[str, dict[str, Any]]:
        """The ``services`` object of the state file: every process that serves, by name."""
        out: dict[str, dict[str, Any]] = {}
        for p in self._launched:
            if p.record is not None:
                out[p.name] = {
                    "address": p.record.address,
                    "metrics_address": p.record.metrics_address,
                    "pid": p.pid,
                    "log": str(p.log),
                    **p.record.extra,
                }
        return out

    def _launch(self, name: str, role: str, flags: list[str], **extra: str) -> Launched:
        common = [
            "--host", HOST, "--port", "0", "--metrics-port", "0", "--namespace", self._namespace,
        ]  # fmt: skip
        # later flags win: a service's own (the router's --port) over the common ones; the Redis
        # URL goes in the environment, and the embedded Redis's password stays in its 0600 file:
        # neither `ps` nor the environment shows it
        env = {"SCEPSY_REDIS_URL": self._url}
        if self._redis_state.get("embedded"):
            env = {
                "SCEPSY_REDIS_URL": str(self._redis_state["url"]),
                "SCEPSY_REDIS_PASSWORD_FILE": str(self._home / PASSWORD_FILE),
            }
        started = launch(self._home, name, role, [*common, *flags], env=env, **extra)
        self._launched.append(started)
        self._processes.append({"role": role, **extra, "pid": started.pid, "log": str(started.log)})
        self._save()
        return started

    def _save(self) -> None:
        _write_state(
            {"redis": self._redis_state, "processes": self._processes, "services": self.services()}
        )


# ---------------------------------------------------------------------------------------- down
def cmd_down(args: argparse.Namespace) -> int:
    state = read_state()
    if state is None:
        print("nothing is up")
        return 0
    t0 = time.monotonic()
    processes = state["processes"]
    # services first, so they deregister while Redis still runs
    stop_pids((p["pid"] for p in processes if p["role"] != "redis"), args.timeout)
    stop_pids((p["pid"] for p in processes if p["role"] == "redis"), args.timeout)
    _state_path().unlink()
    print(f"stopped {len(processes)} processes in {time.monotonic() - t0:.2f}s")
    return 0


# ---------------------------------------------------------------------------------------- nodes
def cmd_nodes(args: argparse.Namespace) -> int:
    url = resolve_redis_url(args.redis_url)
    nodes = with_store(args, Store.list_nodes)
    if args.json:
        print(
            json.dumps({"redis_url": redact(url), "nodes": [node_json(n) for n in nodes]}, indent=1)
        )
    else:
        print(nodes_table(nodes, now=time.time()))
    return 0


def node_json(node: NodeInventory) -> dict[str, Any]:
    return {
        "name": node.name,
        "hostname": node.hostname,
        "source": node.source.value,
        "driver_version": node.driver_version,
        "agent_address": node.agent_address,
        "heartbeat_at": node.heartbeat_at,
        "gpus": [
            {
                "index": g.index,
                "uuid": g.uuid,
                "name": g.name,
                "gpu_type": g.gpu_type,
                "memory_total_bytes": g.memory_total_bytes,
                "memory_free_bytes": g.memory_free_bytes,
                "compute_capability": g.compute_capability,
                "mig_enabled": g.mig_enabled,
                "numa_node": g.numa_node,
                "cpu_affinity": g.cpu_affinity,
            }
            for g in node.gpus
        ],
        "nvlink_domains": [list(d) for d in node.domains],
        "links": [
            {
                "gpus": [link.gpu_a, link.gpu_b],
                "nvlink_count": link.nvlink_count,
                "nvlink_p2p": link.nvlink_p2p,
                "pcie_level": link.pcie_level.name,
            }
            for link in node.links
        ],
    }


def nodes_table(nodes: list[NodeInventory], now: float) -> str:
    header = ("NODE", "SOURCE", "GPUS", "MEMORY", "FREE", "NVLINK DOMAINS", "AGENT", "SEEN")
    rows = [header]
    for n in nodes:
        types = sorted({g.gpu_type for g in n.gpus})
        total = sum(g.memory_total_bytes for g in n.gpus) / GIB
        free = sum(g.memory_free_bytes for g in n.gpus) / GIB
        domains = " ".join("[" + ",".join(map(str, d)) + "]" for d in n.domains)
        rows.append(
            (
                n.name,
                n.source.value,
                f"{len(n.gpus)}x {'/'.join(types) or '-'}",
                f"{total:.0f} GiB",
                f"{free:.0f} GiB",
                domains or "-",
                n.agent_address or "-",
                f"{max(0.0, now - n.heartbeat_at):.1f}s ago",
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]
    total_gpus = sum(len(n.gpus) for n in nodes)
    lines.append(f"{len(nodes)} nodes, {total_gpus} GPUs")
    return "\n".join(lines)
