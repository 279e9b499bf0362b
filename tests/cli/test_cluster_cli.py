"""`scepsy up`, `status`, `nodes`, `down` as a user runs them: real processes (the whole suite), a
real embedded Redis, real gRPC and HTTP over loopback."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from protos.scepsy.v1 import planner_pb2, planner_pb2_grpc
from services.cli import status as status_cli
from services.cli.cluster import alive
from services.runtime.store import Store

REPO = Path(__file__).resolve().parents[2]
CLUSTER = REPO / "deploy/examples/cluster-2xh100.yaml"
SPEC = REPO / "deploy/examples/spec-rag.yaml"
SUITE = ["agent/h100-0", "agent/h100-1", "placer", "planner", "profiler", "router"]

pytestmark = pytest.mark.slow


def scepsy(
    home: Path, *args: str, redis_url: str | None = None, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if k != "REDIS_URL" and not k.startswith("SCEPSY_")}
    base |= {"SCEPSY_HOME": str(home)} | (env or {})
    if redis_url:
        base["REDIS_URL"] = redis_url
    return subprocess.run(
        [sys.executable, "-m", "services.cli", *args],
        cwd=REPO,
        env=base,
        capture_output=True,
        check=False,
        text=True,
        timeout=120,
    )


def status(home: Path, capsys: pytest.CaptureFixture[str], *args: str) -> dict[str, Any]:
    """`scepsy status --json`, in this process (SCEPSY_HOME set by the test)."""
    assert os.environ["SCEPSY_HOME"] == str(home)
    parser = argparse.ArgumentParser(prog="scepsy")
    status_cli.register(parser.add_subparsers(dest="command", required=True))
    parsed = parser.parse_args(["status", "--json", *args])
    capsys.readouterr()
    assert parsed.func(parsed) == 0
    doc: dict[str, Any] = json.loads(capsys.readouterr().out)
    return doc


def processes_of(home: Path) -> set[int]:
    """Live processes started for this test's state dir (they inherit SCEPSY_HOME)."""
    marker = f"SCEPSY_HOME={home}".encode()
    found = set()
    for environ in Path("/proc").glob("[0-9]*/environ"):
        try:
            entries = environ.read_bytes().split(b"\0")
        except OSError:
            continue
        pid = int(environ.parent.name)
        if marker in entries and pid != os.getpid():
            found.add(pid)
    return {p for p in found if alive(p)}


def metrics(address: str) -> str:
    with urllib.request.urlopen(f"http://{address}/metrics", timeout=5) as response:
        text: str = response.read().decode()
    return text


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    monkeypatch.setenv("SCEPSY_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("REDIS_URL", raising=False)
    yield tmp_path / "home"
    scepsy(tmp_path / "home", "down")  # never leave processes behind, even when a test fails


def test_up_status_metrics_down(home: Path, capsys: pytest.CaptureFixture[str]) -> None:
    up = scepsy(home, "up", "--cluster", str(CLUSTER), "--json")
    assert up.returncode == 0, up.stderr
    started = json.loads(up.stdout)
    roles = [p["role"] for p in started["processes"]]
    assert roles == ["redis", "agent", "agent", "profiler", "placer", "router", "planner"]
    pids = [p["pid"] for p in started["processes"]]
    assert all(alive(pid) for pid in pids)
    services = started["services"]
    assert sorted(services) == SUITE
    assert services["router"]["http_address"].startswith("127.0.0.1:")
    assert services["agent/h100-0"]["node"] == "h100-0"
    state = json.loads((home / "state.json").read_text())
    assert state["services"] == services and state["processes"] == started["processes"]
    assert state["redis"] == {"url": started["redis_url"], "embedded": True, "namespace": "scepsy"}

    # the planner was pointed at the profiler and placer that `up` started
    planner_log = Path(services["planner"]["log"])
    assert planner_log.exists()
    cmdline = Path(f"/proc/{services['planner']['pid']}/cmdline").read_bytes().split(b"\0")
    assert services["profiler"]["address"].encode() in cmdline
    assert services["placer"]["address"].encode() in cmdline

    doc = status(home, capsys)
    assert doc["redis"]["reachable"] and doc["redis"]["embedded"]
    listed = {s["name"]: s for s in doc["services"]}
    assert sorted(listed) == SUITE
    for name, s in listed.items():
        assert s["healthy"] and s["health"] == "SERVING", s
        assert s["registered"] and s["running"], s
        assert s["address"] == services[name]["address"]
        assert s["metrics_address"] == services[name]["metrics_address"]
        assert s["pid"] == services[name]["pid"]
    assert listed["router"]["http_address"] == services["router"]["http_address"]
    assert [(n["name"], n["gpus"]) for n in doc["nodes"]] == [("h100-0", 8), ("h100-1", 8)]
    assert {n["agent_address"] for n in doc["nodes"]} == {
        services["agent/h100-0"]["address"],
        services["agent/h100-1"]["address"],
    }
    assert doc["plan"] is None

    # a plan through the suite: the planner calls the profiler and the placer
    planned = scepsy(home, "plan", "--spec", str(SPEC), "--json")
    assert planned.returncode == 0, planned.stderr
    planned_doc = json.loads(planned.stdout)
    assert planned_doc["planner"] == services["planner"]["address"]
    plan_id = planned_doc["id"]
    current = status(home, capsys)
    assert current["plan"]["id"] == plan_id
    assert current["plan_from"] == f"planner at {services['planner']['address']}"

    # a call that fails, counted by its code
    async def missing_plan() -> grpc.StatusCode:
        async with grpc.aio.insecure_channel(services["planner"]["address"]) as channel:
            try:
                await planner_pb2_grpc.PlannerStub(channel).GetPlan(
                    planner_pb2.GetPlanRequest(id="nope"), timeout=5
                )
            except grpc.aio.AioRpcError as exc:
                return exc.code()
        raise AssertionError("GetPlan of an unknown id succeeded")

    assert asyncio.run(missing_plan()) == grpc.StatusCode.NOT_FOUND

    health = 'method="Check",service="grpc.health.v1.Health"'
    for name in SUITE:
        text = metrics(services[name]["metrics_address"])
        assert f'scepsy_rpc_handled_total{{code="OK",{health}}}' in text, name
        assert "scepsy_rpc_seconds_bucket" in text
    planner = metrics(services["planner"]["metrics_address"])
    assert 'scepsy_rpc_handled_total{code="OK",method="Plan",service="scepsy.v1.Planner"} 1.0' in (
        planner
    )
    # the first status asked for the current plan before there was one; then the unknown id
    assert (
        'scepsy_rpc_errors_total{code="NOT_FOUND",method="GetPlan",service="scepsy.v1.Planner"} '
        "2.0" in planner
    )
    assert 'scepsy_planner_plans_total{stored="new"} 1.0' in planner
    profiler = metrics(services["profiler"]["metrics_address"])
    assert 'method="Profile",service="scepsy.v1.Profiler"' in profiler
    assert 'scepsy_profiler_profiles_total{source="computed"}' in profiler
    placer = metrics(services["placer"]["metrics_address"])
    assert "scepsy_placer_placements_total 1.0" in placer
    assert "scepsy_placer_stranded_gpus" in placer
    router = metrics(services["router"]["metrics_address"])
    assert "scepsy_router_requests" in router  # the router's own figures, on the metrics port too
    assert "scepsy_router_requests" in metrics(services["router"]["http_address"])

    listed_nodes = scepsy(home, "nodes", "--json")
    assert listed_nodes.returncode == 0, listed_nodes.stderr
    nodes = json.loads(listed_nodes.stdout)["nodes"]
    assert [n["name"] for n in nodes] == ["h100-0", "h100-1"]
    assert all(n["nvlink_domains"] == [list(range(8))] for n in nodes)

    again = scepsy(home, "up", "--cluster", str(CLUSTER))
    assert again.returncode == 2 and "already up" in again.stderr

    down = scepsy(home, "down")
    assert down.returncode == 0, down.stderr
    assert "stopped 7 processes" in down.stdout
    assert not any(alive(pid) for pid in pids)
    assert processes_of(home) == set()
    assert not (home / "state.json").exists()
    after = scepsy(home, "nodes")
    assert after.returncode == 2 and "no cluster is up here" in after.stderr


def test_up_with_external_redis_starts_no_embedded_server(
    home: Path, redis_url: str, namespace: str, capsys: pytest.CaptureFixture[str]
) -> None:
    up = scepsy(home, "up", "--cluster", str(CLUSTER), "--namespace", namespace, "--json",
                redis_url=redis_url)  # fmt: skip
    assert up.returncode == 0, up.stderr
    started = json.loads(up.stdout)
    assert started["redis_url"] == redis_url and not started["redis"]["embedded"]
    assert "redis" not in [p["role"] for p in started["processes"]]

    async def announced() -> list[str]:
        store = Store.connect(redis_url, namespace=namespace)
        try:
            return [r.name for r in await store.list_services()]
        finally:
            await store.close()

    assert sorted(asyncio.run(announced())) == [
        "agent", "agent", "placer", "planner", "profiler", "router",
    ]  # fmt: skip
    doc = status(home, capsys)
    assert doc["redis"]["namespace"] == namespace and not doc["redis"]["embedded"]
    assert all(s["healthy"] for s in doc["services"]) and len(doc["services"]) == 6

    assert scepsy(home, "down").returncode == 0
    assert processes_of(home) == set()
    # every service withdrew its announcement and the agents deregistered, without a TTL
    assert asyncio.run(announced()) == []
    nodes = scepsy(home, "nodes", "--json", "--namespace", namespace, redis_url=redis_url)
    assert json.loads(nodes.stdout)["nodes"] == []


def test_a_service_that_cannot_start_fails_up_and_stops_the_others(home: Path) -> None:
    up = scepsy(home, "up", "--cluster", str(CLUSTER), env={"SCEPSY_SPREAD_WINDOW": "0"})
    assert up.returncode == 2
    assert up.stderr.startswith("error: placer exited with status 2; last lines of ")
    assert "spread_window (SCEPSY_SPREAD_WINDOW): must be in 1..1024, got '0'" in up.stderr
    assert up.stdout == ""
    assert processes_of(home) == set()
    assert not (home / "state.json").exists()


def test_a_taken_port_fails_up_and_stops_the_others(home: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        up = scepsy(home, "up", "--cluster", str(CLUSTER), "--router-port", str(port))
    assert up.returncode == 2
    assert up.stderr.startswith("error: router exited with status 2; last lines of ")
    assert f"port: cannot listen on 127.0.0.1:{port}" in up.stderr
    assert processes_of(home) == set()
    assert not (home / "state.json").exists()


def test_malformed_cluster_fails_cleanly(home: Path, tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("version: 1\nnodes:\n  - {name: a, gpu_type: H100-SXM, gpus: eight}\n")
    up = scepsy(home, "up", "--cluster", str(bad))
    assert up.returncode == 2
    assert "bad.yaml: nodes[0].gpus: must be a positive integer, got 'eight'" in up.stderr
    assert up.stdout == ""
    assert not (home / "state.json").exists()
    assert processes_of(home) == set()


def test_malformed_cluster_starts_nothing(home: Path, tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("version: 1\nnodes: []\n")
    assert scepsy(home, "up", "--cluster", str(bad)).returncode == 2
    assert processes_of(home) == set()
    assert not home.exists() or not (home / "redis.log").exists()


def test_bad_flags_are_named(home: Path) -> None:
    up = scepsy(home, "up", "--http-port", "70000")
    assert up.returncode == 2 and "--http-port: must be in 0..65535, got 70000" in up.stderr
    assert processes_of(home) == set()
