"""deploy/compose.yaml starts what it claims: every Scepsy service it lists, run here as a process
with the image's entry point and environment plus the file's command, environment and secrets
(from deploy/.env.example), becomes healthy in ``depends_on`` order, and the file's health checks
pass. A real Redis server with the env file's password stands in for the redis container; the
agent runs without engines from a declared cluster holding its node (no GPUs here)."""

from __future__ import annotations

import asyncio
import os
import re
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import yaml

from services.runtime.redis_server import RedisServer
from services.runtime.store import Store
from tests.deploy.deployfiles import (
    DEPLOY,
    REPO,
    SCEPSY,
    Container,
    Local,
    interpolate,
    plan,
    read_env_file,
    read_image,
    write_cluster,
)

LISTEN_PORTS = ("SCEPSY_PORT", "SCEPSY_METRICS_PORT", "SCEPSY_HTTP_PORT")


def load() -> tuple[dict[str, Any], dict[str, str]]:
    env_file = read_env_file(DEPLOY / ".env.example")
    doc = interpolate(yaml.safe_load((DEPLOY / "compose.yaml").read_text()), env_file)
    assert isinstance(doc, dict)
    return doc, env_file


def test_interpolation_refuses_a_missing_secret() -> None:
    raw = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    with pytest.raises(KeyError, match="REDIS_PASSWORD"):
        interpolate(raw, {"SCEPSY_API_KEYS": "k"})


def test_redis_persists_and_requires_the_password_from_its_secret() -> None:
    doc, _ = load()
    redis = doc["services"]["redis"]
    script = " ".join(redis["command"])
    assert "--appendonly yes" in script
    assert "requirepass" in script and "/run/secrets/redis_password" in script
    assert redis["secrets"] == ["redis_password"]
    assert doc["secrets"]["redis_password"] == {"environment": "REDIS_PASSWORD"}
    assert "redis-data:/data" in redis["volumes"]


def test_agent_reserves_the_gpus_and_shares_what_mps_needs() -> None:
    doc, _ = load()
    agent = doc["services"]["agent"]
    devices = agent["deploy"]["resources"]["reservations"]["devices"]
    assert devices[0]["driver"] == "nvidia" and devices[0]["count"] == "all"
    assert agent["ipc"] == "host"
    env = agent["environment"]
    mounts = {v.split(":")[1] for v in agent["volumes"]}
    assert {env["SCEPSY_MPS_PIPE_DIR"], env["SCEPSY_MPS_LOG_DIR"]} <= mounts


async def test_every_service_starts_healthy_in_dependency_order(tmp_path: Path) -> None:
    doc, env_file = load()
    services: dict[str, Any] = doc["services"]
    redis = RedisServer(password=env_file["REDIS_PASSWORD"]).start()
    local = Local(tmp_path)
    try:
        local.map_address("redis", 6379, f"127.0.0.1:{redis.port}")
        containers = _containers(doc, env_file, local, tmp_path)
        # depends_on: condition: service_healthy, as compose orders the start; the one-shot
        # setup services (chown of host directories, as root) are taken as done.
        started: set[str] = {"redis", *_one_shot(services)}
        while len(started) < len(services):
            ready = [
                c
                for c in containers.values()
                if c.name not in started and set(services[c.name]["depends_on"]) <= started
            ]
            assert ready, f"depends_on cycle among {set(services) - started}"
            for c in ready:
                assert services[c.name]["depends_on"]["redis"]["condition"] == "service_healthy"
                local.start(c)
            await local.wait_serving(ready)
            started |= {c.name for c in ready}

        for c in containers.values():  # the file's own health check, in each container's env
            test = services[c.name]["healthcheck"]["test"]
            assert test[0] == "CMD" and test[1] == "scepsy"
            check = await asyncio.create_subprocess_exec(
                str(SCEPSY),
                *test[2:],
                env={**os.environ, **c.local_env},
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.STDOUT,
            )
            output, _ = await asyncio.wait_for(check.communicate(), 30)
            assert check.returncode == 0, (c.name, output)

        await _router_answers_with_its_keys(containers["router"], services["router"], env_file)
        store = Store.connect(redis.url, namespace=containers["agent"].env["SCEPSY_NAMESPACE"])
        try:
            nodes = {n.name for n in await store.list_nodes()}
            records = {r.name for r in await store.list_services()}
        finally:
            await store.close()
        assert nodes == {containers["agent"].env["SCEPSY_NODE_NAME"]}
        # The planner reaches the profiler and placer at the addresses the file gave it, and
        # plans the example spec mounted into it on the agent's node.
        planner = containers["planner"]
        spec = (local.paths["/etc/scepsy"] / "spec-rag.yaml").read_text()
        planned = await plan(f"127.0.0.1:{planner.local_port(planner.health_port)}", spec)
        assert {a.node for a in planned.placement.assignments} == nodes
        assert records == set(containers)
    finally:
        codes = local.stop()
        redis.stop()
    assert codes == dict.fromkeys(containers, 0), codes  # SIGTERM: a graceful stop


def _containers(
    doc: dict[str, Any], env_file: dict[str, str], local: Local, tmp: Path
) -> dict[str, Container]:
    secrets = tmp / "secrets"
    secrets.mkdir()
    for name, source in doc["secrets"].items():
        (secrets / name).write_text(env_file[source["environment"]])
    local.map_path("/run/secrets", secrets)
    containers = {}
    for name, svc in doc["services"].items():
        if name == "redis" or name in _one_shot(doc["services"]):  # not Scepsy processes
            continue
        image = read_image(REPO / svc["build"]["dockerfile"])
        local.map_path(image.env["SCEPSY_HOME"], _dir(tmp / "home" / name))
        for volume in svc.get("volumes", []):
            source, inside = volume.split(":")[:2]
            here = (DEPLOY / source) if source.startswith(".") else _dir(tmp / "volumes" / name)
            local.map_path(inside, here.resolve())
        env = {**image.env, **svc["environment"]}
        if name == "agent":  # no GPUs here: a declared node of the same name, no engines
            env["SCEPSY_ENGINES"] = "off"
            cluster = write_cluster(tmp / "cluster.yaml", [env["SCEPSY_NODE_NAME"]])
            env["SCEPSY_CLUSTER"] = str(cluster)
        container = Container(name, (name,), [*image.entrypoint, *svc["command"]], env)
        container.health_port = int(env["SCEPSY_PORT"])
        local.map_ports(container, sorted({int(env[p]) for p in LISTEN_PORTS if p in env}))
        containers[name] = container
    return containers


def _one_shot(services: dict[str, Any]) -> set[str]:
    """Services others wait for to complete (not to be healthy)."""
    return {
        name
        for svc in services.values()
        for name, dependency in svc.get("depends_on", {}).items()
        if dependency["condition"] == "service_completed_successfully"
    }


def test_the_agents_host_directories_belong_to_its_user() -> None:
    doc, _ = load()
    services = doc["services"]
    assert _one_shot(services) == {"agent-dirs"}
    setup = services["agent-dirs"]
    user = re.search(
        r"^USER (\S+)$", (REPO / services["agent"]["build"]["dockerfile"]).read_text(), re.M
    )
    assert user is not None
    assert setup["user"] == "root"
    assert setup["entrypoint"][:2] == ["chown", user.group(1)]
    agent_env = services["agent"]["environment"]
    assert set(setup["entrypoint"][2:]) == {
        agent_env["SCEPSY_MPS_PIPE_DIR"],
        agent_env["SCEPSY_MPS_LOG_DIR"],
    }
    assert set(setup["volumes"]) <= set(services["agent"]["volumes"])


def _dir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path


async def _router_answers_with_its_keys(
    router: Container, spec: dict[str, Any], env_file: dict[str, str]
) -> None:
    published = {int(p.rsplit(":", 1)[1]) for p in spec["ports"]}
    http_port = int(router.env["SCEPSY_HTTP_PORT"])
    assert published == {http_port, router.health_port}, "publish the HTTP and gRPC ports"
    http = router.ports[http_port]
    url = f"http://127.0.0.1:{http}/v1/models"
    key = env_file["SCEPSY_API_KEYS"]

    def get(headers: dict[str, str]) -> int:
        request = urllib.request.Request(url, headers=headers)
        try:
            with urllib.request.urlopen(request, timeout=5) as response:
                return int(response.status)
        except urllib.error.HTTPError as exc:
            return int(exc.code)

    assert await asyncio.to_thread(get, {"Authorization": f"Bearer {key}"}) == 200
    assert await asyncio.to_thread(get, {"Authorization": "Bearer wrong"}) == 401
