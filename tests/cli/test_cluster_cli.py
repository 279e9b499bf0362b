"""`scepsy up`, `nodes`, `down` as a user runs them: real processes, a real embedded Redis."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from services.cli.cluster import alive

REPO = Path(__file__).resolve().parents[2]
CLUSTER = REPO / "deploy/examples/cluster-2xh100.yaml"


def scepsy(
    home: Path, *args: str, redis_url: str | None = None
) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "REDIS_URL"} | {"SCEPSY_HOME": str(home)}
    if redis_url:
        env["REDIS_URL"] = redis_url
    return subprocess.run(
        [sys.executable, "-m", "services.cli", *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        check=False,
        text=True,
        timeout=60,
    )


@pytest.fixture
def home(tmp_path: Path) -> Iterator[Path]:
    yield tmp_path
    scepsy(tmp_path, "down")  # never leave processes behind, even when a test fails


def test_up_nodes_down(home: Path) -> None:
    up = scepsy(home, "up", "--cluster", str(CLUSTER), "--json")
    assert up.returncode == 0, up.stderr
    started = json.loads(up.stdout)
    pids = [p["pid"] for p in started["processes"]]
    assert [p["role"] for p in started["processes"]] == ["redis", "agent", "agent"]
    assert all(alive(pid) for pid in pids)

    listed = scepsy(home, "nodes", "--json")
    assert listed.returncode == 0, listed.stderr
    nodes = json.loads(listed.stdout)["nodes"]
    assert [n["name"] for n in nodes] == ["h100-0", "h100-1"]
    for n in nodes:
        assert len(n["gpus"]) == 8 and n["gpus"][0]["gpu_type"] == "H100-SXM"
        assert n["nvlink_domains"] == [list(range(8))]
        assert n["source"] == "declared" and n["agent_address"].startswith("127.0.0.1:")

    table = scepsy(home, "nodes")
    assert "2 nodes, 16 GPUs" in table.stdout
    assert "[0,1,2,3,4,5,6,7]" in table.stdout and "640 GiB" in table.stdout

    again = scepsy(home, "up", "--cluster", str(CLUSTER))
    assert again.returncode == 2 and "already up" in again.stderr

    down = scepsy(home, "down")
    assert down.returncode == 0 and "stopped 3 processes" in down.stdout
    assert not any(alive(pid) for pid in pids)
    after = scepsy(home, "nodes")
    assert after.returncode == 2 and "no cluster is up here" in after.stderr


def test_up_with_external_redis_starts_no_embedded_server(home: Path, redis_url: str) -> None:
    up = scepsy(home, "up", "--cluster", str(CLUSTER), "--json", redis_url=redis_url)
    assert up.returncode == 0, up.stderr
    started = json.loads(up.stdout)
    assert started["redis_url"] == redis_url
    assert [p["role"] for p in started["processes"]] == ["agent", "agent"]
    nodes = scepsy(home, "nodes", "--json", redis_url=redis_url)
    assert {n["name"] for n in json.loads(nodes.stdout)["nodes"]} >= {"h100-0", "h100-1"}
    assert scepsy(home, "down").returncode == 0
    # the agents deregistered on SIGTERM, without waiting for their TTL
    nodes = scepsy(home, "nodes", "--json", redis_url=redis_url)
    assert not {"h100-0", "h100-1"} & {n["name"] for n in json.loads(nodes.stdout)["nodes"]}


def test_malformed_cluster_fails_cleanly(home: Path, tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("version: 1\nnodes:\n  - {name: a, gpu_type: H100-SXM, gpus: eight}\n")
    up = scepsy(home, "up", "--cluster", str(bad))
    assert up.returncode == 2
    assert "bad.yaml: nodes[0].gpus: must be a positive integer, got 'eight'" in up.stderr
    assert up.stdout == ""
    assert not (home / "state.json").exists()


def test_malformed_cluster_starts_nothing(home: Path, tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("version: 1\nnodes: []\n")
    before = _redis_like_processes()
    assert scepsy(home, "up", "--cluster", str(bad)).returncode == 2
    assert _redis_like_processes() == before


def _redis_like_processes() -> set[int]:
    pids = set()
    for stat in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            cmd = stat.read_bytes()
        except OSError:
            continue
        if b"valkey-server" in cmd or b"redis-server" in cmd:
            pids.add(int(stat.parent.name))
    return {p for p in pids if alive(p)}
