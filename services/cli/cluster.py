"""``scepsy up``, ``scepsy down``, ``scepsy nodes``: one host's cluster and its inventory.

``up`` starts an embedded Redis (unless ``--redis-url``/``REDIS_URL`` names one) and node agents:
one NVML agent for this host, or one agent per node of a declared cluster file. What it started
is recorded in ``<state dir>/state.json`` (``$SCEPSY_HOME``, default ``./.scepsy``) so that
``down`` can stop exactly that and ``nodes`` can find Redis.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from services.cli.store_args import add_store_flags, with_store
from services.core.cluster.declared import load_cluster
from services.core.cluster.hardware import GIB
from services.core.cluster.inventory import NodeInventory
from services.core.errors import InvalidInputError, ScepsyError, UnavailableError
from services.runtime.redis_server import RedisServer
from services.runtime.store import Store


def register(sub: Any) -> None:
    up = sub.add_parser("up", help="start Redis and the node agents of this host")
    up.add_argument("--cluster", help="declared cluster YAML: one agent per node (GPU-less hosts)")
    up.add_argument("--redis-url", help="use this Redis instead of an embedded one (env REDIS_URL)")
    up.add_argument("--timeout", type=float, default=30.0, help="seconds to wait for the agents")
    up.add_argument("--json", action="store_true", help="print what was started as JSON")
    up.set_defaults(func=cmd_up)

    down = sub.add_parser("down", help="stop what `scepsy up` started")
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


def _read_state() -> dict[str, Any] | None:
    path = _state_path()
    if not path.exists():
        return None
    state: dict[str, Any] = json.loads(path.read_text())
    return state


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


def _stop_pid(pid: int, timeout_s: float = 10.0) -> None:
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + timeout_s
    while alive(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    if alive(pid):
        os.kill(pid, signal.SIGKILL)


def resolve_redis_url(flag: str | None) -> str:
    url = flag or os.environ.get("REDIS_URL")
    if url:
        return url
    state = _read_state()
    if state is None:
        raise UnavailableError(
            "no cluster is up here: run `scepsy up` first, or pass --redis-url / set REDIS_URL"
        )
    return str(state["redis"]["url"])


# ---------------------------------------------------------------------------------------- up
def cmd_up(args: argparse.Namespace) -> int:
    state = _read_state()
    if state is not None and any(alive(p["pid"]) for p in state["processes"]):
        raise InvalidInputError(f"already up (state in {_state_path()}); run `scepsy down` first")
    t0 = time.monotonic()
    # validate everything before starting anything
    if args.cluster:
        names = [n.name for n in load_cluster(args.cluster)]
        cluster_args = ["--cluster", str(Path(args.cluster).resolve())]
    else:
        names = [socket.gethostname()]
        cluster_args = []
    home = state_dir()
    home.mkdir(parents=True, exist_ok=True)
    processes: list[dict[str, Any]] = []
    given: str | None = args.redis_url or os.environ.get("REDIS_URL")
    embedded = given is None
    url = given or ""
    if embedded:
        redis = RedisServer(workdir=home).start()
        assert redis.process is not None
        url = redis.url
        processes.append(
            {"role": "redis", "pid": redis.process.pid, "log": str(home / "redis.log")}
        )

    try:
        for name in names:
            log_path = home / f"agent-{name}.log"
            with open(log_path, "ab") as log:
                proc = subprocess.Popen(
                    [
                        sys.executable,
                        "-m",
                        "services.agent",
                        *cluster_args,
                        "--node-name",
                        name,
                        "--redis-url",
                        url,
                    ],
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
            processes.append({"role": "agent", "node": name, "pid": proc.pid, "log": str(log_path)})
        _state_path().write_text(
            json.dumps(
                {"redis": {"url": url, "embedded": embedded}, "processes": processes}, indent=1
            )
        )
        _wait_for_nodes(url, names, processes, args.timeout)
    except ScepsyError:
        for p in reversed(processes):
            _stop_pid(p["pid"])
        _state_path().unlink(missing_ok=True)
        raise
    elapsed = time.monotonic() - t0
    if args.json:
        print(
            json.dumps(
                {"redis_url": url, "nodes": names, "processes": processes, "seconds": elapsed}
            )
        )
    else:
        print(f"redis   {url}{' (embedded)' if embedded else ''}")
        print(f"agents  {len(names)} ({', '.join(names)}) registered in {elapsed:.2f}s")
        print(f"state   {_state_path()}")
    return 0


def _wait_for_nodes(
    url: str, names: list[str], processes: list[dict[str, Any]], timeout: float
) -> None:
    async def wait() -> None:
        store = Store.connect(url)
        try:
            deadline = time.monotonic() + timeout
            while True:
                for p in processes:
                    if p["role"] == "agent" and not alive(p["pid"]):
                        tail = _log_tail(p["log"])
                        raise UnavailableError(f"agent for node {p['node']!r} exited:\n{tail}")
                registered = {n.name for n in await store.list_nodes()}
                if set(names) <= registered:
                    return
                if time.monotonic() > deadline:
                    missing = sorted(set(names) - registered)
                    raise UnavailableError(f"nodes not registered after {timeout}s: {missing}")
                await asyncio.sleep(0.05)
        finally:
            await store.close()

    asyncio.run(wait())


def _log_tail(path: str) -> str:
    return Path(path).read_text(errors="replace")[-800:]


# ---------------------------------------------------------------------------------------- down
def cmd_down(args: argparse.Namespace) -> int:
    state = _read_state()
    if state is None:
        print("nothing is up")
        return 0
    # agents first, so they deregister while Redis still runs
    for p in sorted(state["processes"], key=lambda p: p["role"] == "redis"):
        _stop_pid(p["pid"])
    _state_path().unlink()
    print(f"stopped {len(state['processes'])} processes")
    return 0


# ---------------------------------------------------------------------------------------- nodes
def cmd_nodes(args: argparse.Namespace) -> int:
    url = resolve_redis_url(args.redis_url)
    nodes = with_store(args, Store.list_nodes)
    if args.json:
        print(json.dumps({"redis_url": url, "nodes": [node_json(n) for n in nodes]}, indent=1))
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
