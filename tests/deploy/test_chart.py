"""The Helm chart starts what it claims: rendered with ci/declared.yaml (a GPU-less cluster), every
Deployment's and the agent DaemonSet's container, run here as a process with the image's entry
point and environment plus the pod's args, env (Secrets, ConfigMap, downward API) and mounted
files, answers its gRPC probe SERVING; one agent per declared node, as the DaemonSet would run on
each. A real Redis server with the password of the chart's Secret stands in for the Redis
StatefulSet. Values the chart must refuse are refused with a message naming the value."""

from __future__ import annotations

import base64
import re
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

import helm_python as helm
import pytest
import yaml

from scripts.check_deploy import CHART, manifests, render
from services.core.cluster.declared import parse_cluster
from services.runtime.redis_server import RedisServer, free_port
from services.runtime.redis_url import checked, redact
from services.runtime.store import Store
from tests.deploy.deployfiles import DEPLOY, Container, Local, plan, read_image

IMAGES = {"image": DEPLOY / "docker/Dockerfile", "agentImage": DEPLOY / "docker/Dockerfile.agent"}
WORKLOADS = ("Deployment", "DaemonSet")


def rendered(values_file: str) -> list[dict[str, Any]]:
    return [obj for _, obj in manifests(render(CHART / "ci" / values_file))]


def by_kind(objects: list[dict[str, Any]], kind: str) -> dict[str, dict[str, Any]]:
    return {o["metadata"]["name"]: o for o in objects if o["kind"] == kind}


KEYS = {"apiKeys": {"keys": ["k"]}}


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"router": KEYS, "redis": {"mode": "sentinel"}}, "redis.sentinel.hosts: required"),
        (
            {"router": KEYS, "redis": {"mode": "cluster"}},
            'redis.mode: must be internal, external or sentinel, got "cluster"',
        ),
        ({"router": KEYS, "redis": {"mode": "external"}}, "redis.external.host: required"),
        ({}, "router.apiKeys: give keys or existingSecret"),
        ({"router": KEYS, "agent": {"useDeclaredCluster": True}}, "cluster: required"),
        # values.schema.json: a misspelt key or a value out of its set
        ({"router": KEYS, "redis": {"mdoe": "external"}}, "additional properties 'mdoe'"),
        ({"router": KEYS, "agent": {"engines": "yes"}}, "value must be one of 'auto', 'on', 'off'"),
    ],
)
def test_values_the_chart_refuses(values: dict[str, Any], message: str) -> None:
    chart = helm.Chart.load(CHART)
    with pytest.raises(helm.HelmError, match=re.escape(message)):
        chart.render(values, name="scepsy", namespace="scepsy")


def test_only_the_router_is_reachable_from_outside() -> None:
    policies = by_kind(rendered("default.yaml"), "NetworkPolicy")
    open_to_all = []
    for policy in policies.values():
        for rule in policy["spec"].get("ingress", []):
            if "from" not in rule:  # no peers named: any source
                open_to_all.append(policy["spec"]["podSelector"]["matchLabels"])
    assert open_to_all == [
        {
            "app.kubernetes.io/name": "scepsy",
            "app.kubernetes.io/instance": "scepsy",
            "app.kubernetes.io/component": "router",
        }
    ]
    deny = policies["scepsy-default-deny"]["spec"]
    assert deny["policyTypes"] == ["Ingress"] and "ingress" not in deny


def test_agent_daemonset_holds_the_gpus_of_gpu_nodes_with_what_mps_needs() -> None:
    agent = by_kind(rendered("default.yaml"), "DaemonSet")["scepsy-agent"]["spec"]["template"]
    pod = agent["spec"]
    container = pod["containers"][0]
    assert pod["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 8
    assert pod["hostIPC"] is True
    env = {e["name"]: e.get("value") for e in container["env"]}
    mounts = {m["mountPath"] for m in container["volumeMounts"]}
    assert {env["SCEPSY_MPS_PIPE_DIR"], env["SCEPSY_MPS_LOG_DIR"]} <= mounts
    assert pod["shareProcessNamespace"] is True  # orphaned engine processes are reaped
    (init,) = pod["initContainers"]  # the shared host directories belong to the agent's user
    user = f"{pod['securityContext']['runAsUser']}:{pod['securityContext']['runAsGroup']}"
    shared = [env["SCEPSY_MPS_PIPE_DIR"], env["SCEPSY_MPS_LOG_DIR"]]
    assert init["command"] == ["chown", user, *shared]
    assert {m["mountPath"] for m in init["volumeMounts"]} == set(init["command"][2:])


def test_external_redis_url_is_encoded_into_the_secret() -> None:
    secret = by_kind(rendered("external-url.yaml"), "Secret")["scepsy-redis"]
    url = base64.b64decode(secret["data"]["redis-url"]).decode()
    # the password "p@ss/word with spaces" must not break the URL apart (a space is %20 in a
    # URL's user info: Redis clients unquote it, they do not read + as a space)
    assert url == "rediss://scepsy:p%40ss%2Fword%20with%20spaces@redis.example.internal:6380/2"
    assert unquote(urlsplit(url).password or "") == "p@ss/word with spaces"


def test_sentinel_redis_url_is_one_the_services_read() -> None:
    secret = by_kind(rendered("sentinel.yaml"), "Secret")["scepsy-redis"]
    url = base64.b64decode(secret["data"]["redis-url"]).decode()
    assert url == (
        "redis+sentinel://:master%20pw%2F1@sentinel-0.redis:26379,sentinel-1.redis:26379,"
        "sentinel-2.redis:26379/scepsy-main/1?sentinel_password=sentinel%20pw"
    )
    assert checked(url) == url and "master" not in redact(url).split("@")[0]


async def test_every_workload_serves(tmp_path: Path) -> None:
    objects = rendered("declared.yaml")
    values = yaml.safe_load((CHART / "ci" / "declared.yaml").read_text())
    secrets = {
        name: {k: base64.b64decode(v).decode() for k, v in s["data"].items()}
        for name, s in by_kind(objects, "Secret").items()
    }
    config_maps = {name: c["data"] for name, c in by_kind(objects, "ConfigMap").items()}
    # The DaemonSet runs one agent on each node: those of the declared cluster here.
    nodes = [n.name for n in parse_cluster(yaml.safe_load(values["cluster"]))]

    redis = RedisServer(password=secrets["scepsy-redis"]["redis-password"]).start()
    local = Local(tmp_path)
    try:
        services = by_kind(objects, "Service")
        local.map_address("scepsy-redis", 6379, f"127.0.0.1:{redis.port}")
        containers: list[Container] = []
        for kind in WORKLOADS:
            for name, workload in by_kind(objects, kind).items():
                pod = workload["spec"]["template"]
                for node in nodes if kind == "DaemonSet" else [nodes[0]]:
                    c = _container(f"{name}@{node}", pod, node, secrets, config_maps, tmp_path)
                    for service, svc in services.items():  # Service -> this pod's ports
                        if svc["spec"]["selector"].items() <= pod["metadata"]["labels"].items():
                            for port in svc["spec"]["ports"]:
                                local.map_address(
                                    service,
                                    port["port"],
                                    f"127.0.0.1:{c.local_port(port['targetPort'])}",
                                )
                    containers.append(c)
        assert len(containers) == len(by_kind(objects, "Deployment")) + len(nodes)
        for c in containers:
            local.start(c)
        await local.wait_serving(containers)
        store = Store.connect(redis.url, namespace=containers[0].env["SCEPSY_NAMESPACE"])
        try:
            registered = {n.name for n in await store.list_nodes()}
            records = sorted(r.name for r in await store.list_services())
        finally:
            await store.close()
        assert registered == set(nodes)
        # The planner reaches the profiler and placer at the addresses the chart gave it.
        planner = next(c for c in containers if c.env.get("SCEPSY_PROFILER_ADDRESS"))
        planned = await plan(
            f"127.0.0.1:{planner.local_port(planner.health_port)}",
            config_maps["scepsy-spec"]["spec.yaml"],
        )
        assert {a.node for a in planned.placement.assignments} <= set(nodes)
        assert planned.placement.assignments
        assert records == sorted(["agent", "agent", "placer", "planner", "profiler", "router"])
    finally:
        codes = local.stop()
        redis.stop()
    assert set(codes.values()) == {0}, codes


def _container(
    name: str,
    pod: dict[str, Any],
    node: str,
    secrets: dict[str, dict[str, str]],
    config_maps: dict[str, dict[str, str]],
    tmp: Path,
) -> Container:
    (spec,) = pod["spec"]["containers"]
    image = read_image(IMAGES["agentImage" if "agent" in spec["image"] else "image"])
    env = dict(image.env)
    for item in spec.get("env", []):
        if "value" in item:
            env[item["name"]] = item["value"]
            continue
        ref = item["valueFrom"]
        if "secretKeyRef" in ref:
            env[item["name"]] = secrets[ref["secretKeyRef"]["name"]][ref["secretKeyRef"]["key"]]
        elif "configMapKeyRef" in ref:
            cm = ref["configMapKeyRef"]
            env[item["name"]] = config_maps[cm["name"]][cm["key"]]
        else:  # the downward API
            field = ref["fieldRef"]["fieldPath"]
            env[item["name"]] = {"spec.nodeName": node, "status.podIP": "127.0.0.1"}[field]
    container = Container(name, (), [*image.entrypoint, *spec["args"]], env)
    volumes = {v["name"]: v for v in pod["spec"].get("volumes", [])}
    for mount in spec.get("volumeMounts", []):
        volume = volumes[mount["name"]]
        here = tmp / "pods" / name / mount["name"]
        here.mkdir(parents=True)
        files: dict[str, str] = {}
        if "configMap" in volume:
            files = config_maps[volume["configMap"]["name"]]
        elif "secret" in volume:
            data = secrets[volume["secret"]["secretName"]]
            files = {i["path"]: data[i["key"]] for i in volume["secret"]["items"]}
        for file, text in files.items():
            (here / file).write_text(text)
        container.paths[mount["mountPath"]] = here
    container.health_port = spec["startupProbe"]["grpc"]["port"]
    container.port_names = {p["name"]: p["containerPort"] for p in spec["ports"]}
    container.ports = {port: free_port() for port in container.port_names.values()}
    return container
