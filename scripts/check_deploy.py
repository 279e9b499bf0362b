"""Check the deploy files without a Docker daemon or a cluster (``make deploy-check``).

1. deploy/compose.yaml against the compose specification (``check-jsonschema --builtin-schema
   vendor.compose-spec``).
2. The Helm chart deploy/helm/scepsy linted strictly (warnings fail) with each values file of
   deploy/helm/scepsy/ci/, through the Helm v4 SDK (``helm_python``, no helm binary).
3. Every manifest rendered from each of those values files validated by ``kubernetes-validate
   --strict`` (unknown fields fail) for the current Kubernetes version and for the oldest the
   chart supports (``kubeVersion`` in Chart.yaml). The ServiceMonitor is a Prometheus Operator
   custom resource that kubernetes-validate has no schema for: its shape is checked here.
4. Both Dockerfiles linted by hadolint (any finding fails).

Prints one line per check and the time it took; exits 1 when any check fails.
"""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import helm_python as helm
import kubernetes_validate
import yaml

ROOT = Path(__file__).resolve().parent.parent
COMPOSE = ROOT / "deploy" / "compose.yaml"
CHART = ROOT / "deploy" / "helm" / "scepsy"
DOCKERFILES = (ROOT / "deploy/docker/Dockerfile", ROOT / "deploy/docker/Dockerfile.agent")
KUBE_VERSIONS = ("1.37.0", "1.27.0")  # current; the chart's kubeVersion floor
RELEASE, NAMESPACE = "scepsy", "scepsy"
BIN = Path(sys.executable).parent


def ci_values() -> list[Path]:
    return sorted((CHART / "ci").glob("*.yaml"))


def render(values_file: Path) -> dict[str, str]:
    """The chart rendered with ``values_file`` as `helm install` would, offline."""
    values = yaml.safe_load(values_file.read_text()) or {}
    chart = helm.Chart.load(CHART)
    return chart.render(values, name=RELEASE, namespace=NAMESPACE, is_install=True)


def manifests(rendered: dict[str, str]) -> Iterator[tuple[str, dict[str, Any]]]:
    """(template, object) for every object of a render (NOTES.txt is text, not a manifest)."""
    for template, text in sorted(rendered.items()):
        if template.endswith("NOTES.txt"):
            continue
        for doc in yaml.safe_load_all(text):
            if doc:
                yield template, doc


def check_compose() -> list[str]:
    done = subprocess.run(
        [BIN / "check-jsonschema", "--builtin-schema", "vendor.compose-spec", COMPOSE],
        capture_output=True,
        text=True,
        check=False,
    )
    return [] if done.returncode == 0 else [done.stdout + done.stderr]


def check_lint() -> list[str]:
    problems = []
    for values_file in ci_values():
        values = yaml.safe_load(values_file.read_text()) or {}
        for kube in KUBE_VERSIONS:
            report = helm.lint(
                CHART, values, strict=True, namespace=NAMESPACE, kube_version=f"v{kube}"
            )
            failed = [m for m in report["messages"] if m["severity"] >= 2]
            problems += [f"{values_file.name} (k8s {kube}): {e}" for e in report["errors"]]
            problems += [
                f"{values_file.name} (k8s {kube}): {m['path']}: {m['error']}" for m in failed
            ]
    return problems


def check_manifests() -> list[str]:
    problems = []
    for values_file in ci_values():
        for template, obj in manifests(render(values_file)):
            where = f"{values_file.name}: {template}: {obj.get('kind')}/{obj['metadata']['name']}"
            if obj.get("kind") == "ServiceMonitor":
                problems += [f"{where}: {p}" for p in _service_monitor_problems(obj)]
                continue
            for kube in KUBE_VERSIONS:
                try:
                    kubernetes_validate.validate(obj, kube, strict=True)
                except kubernetes_validate.ValidationError as exc:
                    problems.append(f"{where} (k8s {kube}): {exc.message} at {list(exc.path)}")
                except kubernetes_validate.SchemaNotFoundError:
                    problems.append(f"{where} (k8s {kube}): no schema for this kind")
    return problems


def _service_monitor_problems(obj: dict[str, Any]) -> list[str]:
    spec = obj.get("spec") or {}
    problems = []
    if obj.get("apiVersion") != "monitoring.coreos.com/v1":
        problems.append(
            f"apiVersion: must be monitoring.coreos.com/v1, got {obj.get('apiVersion')!r}"
        )
    if not (spec.get("selector") or {}).get("matchLabels"):
        problems.append("spec.selector.matchLabels: empty")
    endpoints = spec.get("endpoints") or []
    if not endpoints or any(not e.get("port") for e in endpoints):
        problems.append("spec.endpoints: each needs a named port")
    return problems


def check_dockerfiles() -> list[str]:
    done = subprocess.run(
        [BIN / "hadolint", "--failure-threshold", "info", *DOCKERFILES],
        capture_output=True,
        text=True,
        check=False,
    )
    return [] if done.returncode == 0 else [done.stdout + done.stderr]


CHECKS: tuple[tuple[str, Callable[[], list[str]]], ...] = (
    ("compose.yaml against the compose spec (check-jsonschema)", check_compose),
    ("helm lint --strict, each ci/ values file", check_lint),
    (f"kubernetes-validate --strict {', '.join(KUBE_VERSIONS)}, each render", check_manifests),
    ("hadolint, both Dockerfiles", check_dockerfiles),
)


def main() -> int:
    failed = 0
    started = time.perf_counter()
    for title, check in CHECKS:
        t0 = time.perf_counter()
        problems = check()
        status = "ok" if not problems else "FAILED"
        print(f"{status:6} {time.perf_counter() - t0:5.1f} s  {title}")
        for problem in problems:
            print(f"       {problem}")
        failed += bool(problems)
    took = time.perf_counter() - started
    print(f"deploy checks: {len(CHECKS) - failed}/{len(CHECKS)} passed in {took:.1f} s")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
