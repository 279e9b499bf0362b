"""`scepsy place` as a user runs it: allocation and cluster files in, a placement out."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import pytest

from services.cli import place
from services.core.errors import ScepsyError

REPO = Path(__file__).resolve().parents[2]
CLUSTER = str(REPO / "deploy/examples/cluster-2xh100.yaml")
ALLOCATION = """\
version: 1
fraction_unit: 4
models:
  llama-70b: {tp: 4, replicas: 3}
  llama-8b: {fraction: 0.5, replicas: 3}
  reranker: {fraction: 0.25}
"""


def scepsy_place(*argv: str) -> int:
    """``scepsy place ARGV`` in-process, with the entry point's error handling."""
    parser = argparse.ArgumentParser(prog="scepsy")
    place.register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["place", *argv])
    try:
        code: int = args.func(args)
    except ScepsyError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return code


@pytest.fixture
def allocation(tmp_path: Path) -> str:
    path = tmp_path / "alloc.yaml"
    path.write_text(ALLOCATION)
    return str(path)


def test_json_placement_then_incremental(
    allocation: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert scepsy_place("--allocation", allocation, "--cluster", CLUSTER, "--json") == 0
    out = capsys.readouterr().out
    doc = json.loads(out)
    rows = doc["placement"]["assignments"]
    assert doc["fraction_unit"] == 4 and len(rows) == 7
    tp4 = [r for r in rows if r["model"] == "llama-70b"]
    assert all(len(r["gpus"]) == 4 and r["mps_percentage"] == 100 for r in tp4)
    halves = [r for r in rows if r["model"] == "llama-8b"]
    assert {(r["units"], r["fraction"], r["memory_fraction"]) for r in halves} == {(2, 0.5, 0.475)}
    # 12 GPUs of TP4, 1/2 x 3 + 1/4 = 7/4 on two GPUs: 1/4 stranded
    assert doc["placement"]["fragmentation"]["stranded_fraction"] == 0.25
    assert doc["changes"] == {"kept": 0, "started": 7, "stopped": 0, "moved": 0}

    current = tmp_path / "current.json"
    current.write_text(out)
    assert (
        scepsy_place("--allocation", allocation, "--cluster", CLUSTER, "--current", str(current))
        == 0
    )
    table = capsys.readouterr().out
    assert table.splitlines()[0].split() == [
        "model",
        "replica",
        "node",
        "gpus",
        "share",
        "mps",
        "%",
        "mem",
        "cap",
    ]
    assert "llama-70b  0        h100-" in table
    assert "changes: 7 kept, 0 started, 0 stopped, 0 moved" in table
    assert "fragmentation: 1 partly used GPUs, 0.25 GPUs stranded" in table


def test_bad_allocation_names_the_field(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "alloc.yaml"
    path.write_text("version: 1\nmodels:\n  m: {fraction: 0.3}\n")
    assert scepsy_place("--allocation", str(path), "--cluster", CLUSTER) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert "alloc.yaml: models.m.fraction: must be a multiple of 1/4, got 0.3" in captured.err
    path.write_text("version: 1\nmodels:\n  m: {tp: 3}\n")
    assert scepsy_place("--allocation", str(path), "--cluster", CLUSTER) == 2
    assert "alloc.yaml: models.m.tp: must be one of (1, 2, 4, 8), got 3" in capsys.readouterr().err


def test_infeasible_allocation_says_why(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "alloc.yaml"
    path.write_text("version: 1\nmodels:\n  wide: {tp: 8, replicas: 3}\n")
    assert scepsy_place("--allocation", str(path), "--cluster", CLUSTER, "--json") == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert "error: not_enough_gpus: the allocation needs 24 GPUs, 16 are free" in captured.err
