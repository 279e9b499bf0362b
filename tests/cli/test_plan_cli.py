"""``scepsy plan`` and ``scepsy status``: analytic profiles, a real Redis for ``--store``."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest

from services.cli import plan as plan_cli
from services.cli import status as status_cli
from services.core.errors import InfeasibleError, InvalidInputError
from services.core.perf.backends import clear_cache
from tests.runtime.test_profile_pool import SPEC as BIG  # 15 cold profiles

SPEC = """
version: 1
fraction_unit: 2
models:
  small: Qwen/Qwen2.5-0.5B
  tiny: Qwen/Qwen3-0.6B
cluster: {{gpu_type: L40S, gpus: 2}}
workflows:
  - name: chat
    rate: {rate}
    stats:
      llms:
        small: {{n: 2, prompt_tokens: 300, completion_tokens: 50}}
        tiny: {{n: 1, prompt_tokens: 200, completion_tokens: 20}}
"""
CLUSTER = """
version: 1
nodes:
  - {name: pair, gpu_type: A100-80GB-PCIe, gpus: 4, interconnect: nvlink-pairs}
"""


@pytest.fixture(autouse=True)
def no_suite(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """No `scepsy up` state here: plans are made in-process (offline)."""
    monkeypatch.setenv("SCEPSY_HOME", str(tmp_path / "home"))


def scepsy(*argv: str) -> int:
    parser = argparse.ArgumentParser(prog="scepsy")
    sub = parser.add_subparsers(dest="command", required=True)
    plan_cli.register(sub)
    status_cli.register(sub)
    args = parser.parse_args(argv)
    code: int = args.func(args)
    return code


@pytest.fixture
def spec(tmp_path: Path) -> Path:
    path = tmp_path / "spec.yaml"
    path.write_text(SPEC.format(rate=2.0))
    return path


def test_plan_prints_allocation_predictions_and_placement(
    spec: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert scepsy("plan", "--spec", str(spec)) == 0
    out = capsys.readouterr().out
    assert "of 2 GPUs" in out
    for needle in ("small", "tiny", "chat", "search", "placement:", "fragmentation:"):
        assert needle in out


def test_plan_json_on_another_cluster(
    spec: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cluster = tmp_path / "cluster.yaml"
    cluster.write_text(CLUSTER)
    assert scepsy("plan", "--spec", str(spec), "--cluster", str(cluster), "--json") == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["cluster_gpus"] == 4 and doc["gpus"] <= 4
    assert set(doc["allocation"]) == {"small", "tiny"}
    assert all(a["tp"] <= 2 for a in doc["allocation"].values())  # NVLink pairs: TP 2 at most
    assert {a["node"] for a in doc["placement"]["assignments"]} == {"pair"}
    (chat,) = doc["workflows"]
    assert chat["throughput_rps"] >= chat["target_rps"] / 0.9
    assert doc["search_seconds"] >= doc["profile_seconds"] > 0


def test_infeasible_spec_says_why(tmp_path: Path) -> None:
    spec = tmp_path / "spec.yaml"
    spec.write_text(SPEC.format(rate=100_000))
    with pytest.raises(InfeasibleError, match="best achievable throughput with these GPUs: chat"):
        scepsy("plan", "--spec", str(spec))


def test_store_then_status(
    spec: Path, redis_url: str, namespace: str, capsys: pytest.CaptureFixture[str]
) -> None:
    redis = ("--redis-url", redis_url, "--namespace", namespace)
    assert scepsy("status", "--json", *redis) == 0
    empty = json.loads(capsys.readouterr().out)
    assert (empty["plan"], empty["plans"], empty["plan_from"]) == (None, [], "redis")

    assert scepsy("plan", "--spec", str(spec), "--json", "--store", *redis) == 0
    planned = json.loads(capsys.readouterr().out)
    assert planned["stored"] == {"new": True, "current": True}

    assert scepsy("status", "--json", *redis) == 0
    status = json.loads(capsys.readouterr().out)
    assert status["plan"]["id"] == planned["id"]
    assert status["plan"]["placement"] == planned["placement"]
    assert [p["id"] for p in status["plans"]] == [planned["id"]]

    assert scepsy("status", *redis) == 0
    text = capsys.readouterr().out
    assert f"plan {planned['id']}" in text and "recent plans:" in text
    assert f" * {planned['id']}" in text


def test_offline_plans_read_stored_profiles_and_keep_what_runs(
    spec: Path, redis_url: str, namespace: str, capsys: pytest.CaptureFixture[str]
) -> None:
    redis = ("--redis-url", redis_url, "--namespace", namespace)
    assert scepsy("plan", "--spec", str(spec), "--json", "--store", *redis) == 0
    first = json.loads(capsys.readouterr().out)
    assert first["planner"] == "in-process"
    computed = {m["model"]: m["profile_sources"] for m in first["llms"]}
    assert all(set(s) == {"computed analytic-1"} for s in computed.values()), computed

    # the profiles computed for the first plan were stored: the second reads them
    spec.write_text(SPEC.format(rate=2.5))
    assert scepsy("plan", "--spec", str(spec), "--json", "--store", *redis) == 0
    second = json.loads(capsys.readouterr().out)
    assert second["id"] != first["id"]
    stored = {m["model"]: m["profile_sources"] for m in second["llms"]}
    assert all(set(s) == {"stored analytic-1"} for s in stored.values()), stored

    def where(doc: dict[str, object]) -> set[tuple[object, ...]]:
        placement = doc["placement"]
        assert isinstance(placement, dict)
        return {
            (a["model"], a["replica"], a["node"], tuple(a["gpus"]))
            for a in placement["assignments"]
        }

    kept = {
        a
        for a in where(first)
        if first["allocation"][a[0]]["tp"] == second["allocation"][a[0]]["tp"]
        and first["allocation"][a[0]]["fraction"] == second["allocation"][a[0]]["fraction"]
        and a[1] < second["allocation"][a[0]]["replicas"]
    }
    assert kept <= where(second)


def test_cold_profiles_in_worker_processes_plan_the_same(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    spec = tmp_path / "big.yaml"
    spec.write_text(BIG)
    docs = []
    for workers in ("2", "1"):
        clear_cache()
        assert scepsy("plan", "--spec", str(spec), "--json", "--profile-workers", workers) == 0
        docs.append(json.loads(capsys.readouterr().out))
    pooled, serial = docs
    assert pooled["allocation"] == serial["allocation"]
    assert pooled["objective_s"] == serial["objective_s"]
    # the pool's time is the plan's: profiles computed, counted in the search time
    for doc in docs:
        assert doc["search_seconds"] >= doc["profile_seconds"] > 0
    with pytest.raises(InvalidInputError, match="--profile-workers"):
        scepsy("plan", "--spec", str(spec), "--profile-workers", "-1")
