"""A port already in use is refused at start, by every service: a second instance started on the
gRPC port of a running one exits 2 naming the port (gRPC's SO_REUSEPORT let a second router come
up there and take about half of the new connections)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from services.runtime.redis_server import RedisServer, free_port

REPO = Path(__file__).resolve().parents[2]
SERVICES = ["router", "placer", "planner", "profiler", "agent"]
EXTRA = {"router": ["--http-port", "0"], "agent": ["--node-name", "ports-test"]}
# the agent runs from a declared inventory on a host without NVML
CLUSTER = "version: 1\nnodes:\n  - {name: ports-test, gpu_type: L40S, gpus: 1, interconnect: pcie}"


def _start(service: str, redis_url: str, port: int, log: Path) -> subprocess.Popen[bytes]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SCEPSY_")}
    extra = EXTRA.get(service, [])
    if service == "agent":
        (log.parent / "cluster.yaml").write_text(CLUSTER)
        extra = [*extra, "--cluster", str(log.parent / "cluster.yaml")]
    with open(log, "wb") as out:
        return subprocess.Popen(
            [sys.executable, "-m", f"services.{service}", "--redis-url", redis_url,
             "--namespace", f"ports-{service}", "--host", "127.0.0.1", "--port", str(port),
             "--metrics-port", "0", *extra],
            cwd=REPO, env={**env, "PYTHONPATH": str(REPO)}, stdout=out,
            stderr=subprocess.STDOUT,
        )  # fmt: skip


@pytest.mark.parametrize("service", SERVICES)
def test_a_second_instance_on_a_taken_port_exits_2_naming_the_port(
    service: str, redis_server: RedisServer, tmp_path: Path
) -> None:
    port = free_port()
    first = _start(service, redis_server.url, port, tmp_path / "first.log")
    try:
        deadline = time.monotonic() + 60
        while b"server_started" not in (tmp_path / "first.log").read_bytes():
            assert first.poll() is None, (tmp_path / "first.log").read_text()
            assert time.monotonic() < deadline, "the first instance did not start"
            time.sleep(0.1)
        second = _start(service, redis_server.url, port, tmp_path / "second.log")
        code = second.wait(60)
        out = (tmp_path / "second.log").read_text()
        assert code == 2, out
        assert f"error: port: cannot listen on 127.0.0.1:{port}" in out
        assert "Traceback" not in out
        assert first.poll() is None  # the first one serves on
    finally:
        first.terminate()
        first.wait(30)
