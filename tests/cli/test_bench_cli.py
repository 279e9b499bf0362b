"""``scepsy bench`` and ``scepsy simulate`` as a user runs them (quick, CI-sized)."""

from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path

import pytest

from services.cli import bench, simulate
from services.core.errors import InvalidInputError
from services.core.workload.trace import read_trace


def scepsy(*argv: str) -> int:
    """Parse and run like ``scepsy``, with the two commands registered as main.py does."""
    parser = argparse.ArgumentParser(prog="scepsy")
    sub = parser.add_subparsers(dest="command", required=True)
    bench.register(sub)
    simulate.register(sub)
    args = parser.parse_args(list(argv))
    code: int = args.func(args)
    return code


def test_bench_quick_writes_the_table_curves_and_plots(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "bench"
    code = scepsy(
        "bench", "--quick", "--workflows", "rag", "--gpus", "4", "--systems", "scepsy,static",
        "--json", "--out", str(out),
    )  # fmt: skip
    assert code == 0
    captured = capsys.readouterr()
    doc = json.loads(captured.out)
    assert "rag 4 GPUs" in captured.err  # progress on stderr
    (row,) = doc["comparisons"]
    assert (row["workflow"], row["gpus"], row["baseline"]) == ("rag", 4, "static")
    with open(out / "curves.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    # the peaks in the table are the highest sustainable rates of the plotted curves
    for system, key in (("scepsy", "scepsy_peak"), ("static", "baseline_peak")):
        ok = [
            float(r["rate"]) for r in rows if r["system"] == system and r["sustainable"] == "True"
        ]
        assert row[key] == pytest.approx(max(ok, default=0.0))
    assert (out / "rag.png").stat().st_size > 1000
    assert json.loads((out / "bench.json").read_text())["comparisons"] == doc["comparisons"]
    assert "peak req/s" in (out / "report.txt").read_text()


def test_bench_eval_is_the_same_as_bench(capsys: pytest.CaptureFixture[str]) -> None:
    args = ("--quick", "--workflows", "rag", "--gpus", "4", "--systems", "scepsy,static")
    scepsy("bench", *args, "--json")
    first = json.loads(capsys.readouterr().out)
    scepsy("bench", "eval", *args, "--json")
    second = json.loads(capsys.readouterr().out)
    assert first["comparisons"] == second["comparisons"]


def test_a_block_split_by_gpu_count_matches_one_process(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """``--gpus 8 --prepare-gpus 4``: the 8-GPU half of a ``--gpus 4,8`` run, figure for figure."""
    args = ("--quick", "--workflows", "rag", "--systems", "scepsy,static", "--json")
    scepsy("bench", *args, "--gpus", "4,8")
    whole = json.loads(capsys.readouterr().out)
    scepsy("bench", *args, "--gpus", "8", "--prepare-gpus", "4")
    half = json.loads(capsys.readouterr().out)
    assert half["comparisons"] == [c for c in whole["comparisons"] if c["gpus"] == 8]
    scepsy("bench", *args, "--gpus", "8")
    alone = json.loads(capsys.readouterr().out)  # warmed up on 8 GPUs: another trace
    assert alone["workflows"][0]["isolated_latency"] != half["workflows"][0]["isolated_latency"]
    with pytest.raises(InvalidInputError, match="prepare_gpus: must be positive, got 0"):
        scepsy("bench", *args, "--gpus", "8", "--prepare-gpus", "0")


def test_bench_rejects_bad_lists() -> None:
    with pytest.raises(InvalidInputError, match="--gpus"):
        scepsy("bench", "--quick", "--gpus", "four")
    with pytest.raises(InvalidInputError, match="workflow: unknown"):
        scepsy("bench", "--quick", "--workflows", "nope")


def test_simulate_a_given_allocation_writes_the_trace(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    trace = tmp_path / "rag.jsonl"
    allocation = '{"generator": {"tp": 1, "replicas": 1}, "reranker": {"fraction": 0.5}}'
    code = scepsy(
        "simulate", "--workflow", "rag", "--gpus", "2", "--allocation", allocation,
        "--rate", "1", "--requests", "40", "--trace-out", str(trace), "--json",
    )  # fmt: skip
    assert code == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["requests"] == 40
    assert doc["allocation"]["reranker"] == {"fraction": 0.5, "tp": 1, "replicas": 1}
    recorded = read_trace(trace)
    assert len(recorded.requests) == 40
    assert len(recorded.calls) == doc["calls"]


def test_simulate_as_a_system_plans_first(capsys: pytest.CaptureFixture[str]) -> None:
    code = scepsy(
        "simulate", "--workflow", "rag", "--gpus", "4", "--system", "static",
        "--rate", "2", "--requests", "30",
    )  # fmt: skip
    assert code == 0
    text = capsys.readouterr().out
    assert "generator 2x tp1, reranker 2x tp1 (static)" in text


def test_simulate_a_mix_reports_each_workflows_backlog(capsys: pytest.CaptureFixture[str]) -> None:
    """Static on 4 GPUs at 1.5 req/s of co-serving: RAG keeps up, beam search falls behind."""
    args = ("simulate", "--workflow", "coserve", "--gpus", "4", "--system", "static",
            "--rate", "1.5", "--requests", "400")  # fmt: skip
    assert scepsy(*args, "--json") == 0
    doc = json.loads(capsys.readouterr().out)
    rag, beam = doc["part_backlog_growth"]
    assert abs(rag) < 0.05 < beam
    assert not doc["sustainable"]
    assert scepsy(*args) == 0
    assert f"(parts {rag:+.1%}, {beam:+.1%}), NOT sustainable" in capsys.readouterr().out


def test_bench_gpus_reports_scepsys_gpus_at_each_baselines_latency(
    capsys: pytest.CaptureFixture[str],
) -> None:
    code = scepsy(
        "bench", "gpus", "--workflows", "rag", "--gpus", "4", "--load", "0.3",
        "--baselines", "static", "--json",
    )  # fmt: skip
    assert code == 0
    rows = json.loads(capsys.readouterr().out)["rows"]
    assert [r["against"] for r in rows] == ["scepsy min-latency +10%", "static"]
    for r in rows:
        assert 0 < r["scepsy_gpus"] <= 4 and r["their_gpus"] <= 4
        assert r["saved"] == pytest.approx(r["their_gpus"] - r["scepsy_gpus"])
        # met is the simulator's verdict on the objective
        objective = r["their_latency"] * (1.1 if r["against"].startswith("scepsy") else 1.0)
        assert r["met"] == (r["scepsy_latency"] <= objective * 1.03)


def test_bench_gpus_and_seeds_reject_bad_values() -> None:
    with pytest.raises(InvalidInputError, match="--baselines: unknown"):
        scepsy("bench", "gpus", "--baselines", "nope")
    with pytest.raises(InvalidInputError, match="--load"):
        scepsy("bench", "gpus", "--load", "2")
    with pytest.raises(InvalidInputError, match="--seeds"):
        scepsy("bench", "--quick", "--seeds", "0")


def test_bench_warmup_takes_a_count_or_auto_with_an_error() -> None:
    assert bench.warmup_changes("500") == {"warmup_requests": 500, "warmup_error": None}
    assert bench.warmup_changes("auto:0.02") == {"warmup_error": 0.02}
    assert bench.warmup_changes("auto") == {"warmup_error": 0.01}
    for bad in ("1", "many", "auto:0", "auto:2", "500:3"):
        with pytest.raises(InvalidInputError, match="--warmup"):
            bench.warmup_changes(bad)
    with pytest.raises(InvalidInputError, match="--warmup"):
        scepsy("bench", "--quick", "--warmup", "auto:x")
