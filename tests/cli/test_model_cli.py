"""The performance-model, profile, trace and ALP commands as a user runs them (subprocesses)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from services.core.perf.profile import Profile
from services.core.workload.trace import TraceCall, write_trace

REPO = Path(__file__).resolve().parents[2]
EXAMPLES = REPO / "deploy/examples"


def scepsy(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "services.cli", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def perf(*args: str) -> dict[str, float]:
    out = scepsy(
        "perf",
        "batch",
        "--gpu",
        "H100-SXM",
        "--input-len",
        "512",
        "--output-len",
        "128",
        "--json",
        *args,
    )
    assert out.returncode == 0, out.stderr
    result: dict[str, float] = json.loads(out.stdout)
    return result


def test_perf_batch_throughput_is_defined_like_the_data_set() -> None:
    r = perf("--model", "meta-llama/Llama-3.1-8B", "--tp", "1", "--batch", "16")
    # throughput = batch x (input + output) / latency
    assert r["throughput_tok_s"] == pytest.approx(16 * (512 + 128) / r["latency_s"])
    bigger = perf("--model", "meta-llama/Llama-3.1-8B", "--tp", "1", "--batch", "64")
    assert bigger["latency_s"] > r["latency_s"]  # more work takes longer...
    assert bigger["throughput_tok_s"] > r["throughput_tok_s"]  # ...but batching pays
    # 70B needs TP: on 4 GPUs it runs, on 1 it does not fit (exit 2, says why)
    assert perf("--model", "meta-llama/Llama-3.1-70B", "--tp", "4", "--batch", "8")["latency_s"] > 0
    one = scepsy(
        "perf",
        "batch",
        "--model",
        "meta-llama/Llama-3.1-70B",
        "--gpu",
        "H100-SXM",
        "--tp",
        "1",
        "--batch",
        "8",
        "--input-len",
        "512",
        "--output-len",
        "128",
    )
    assert one.returncode == 2 and "GiB" in one.stderr and one.stdout == ""


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--gpu", "TPU-v5"], "gpu type 'TPU-v5'"),
        (["--model", "acme/unknown-7b"], "acme/unknown-7b"),
    ],
)
def test_perf_bad_input(args: list[str], message: str) -> None:
    base = {"--model": "meta-llama/Llama-3.1-8B", "--gpu": "H100-SXM"}
    base.update(dict(zip(args[::2], args[1::2], strict=True)))
    flat = [x for kv in base.items() for x in kv]
    out = scepsy("perf", "batch", *flat, "--batch", "1", "--input-len", "8", "--output-len", "8")
    assert out.returncode == 2 and message in out.stderr


def test_profile_writes_a_loadable_profile(tmp_path: Path) -> None:
    path = tmp_path / "p.json"
    out = scepsy(
        "profile",
        "--backend",
        "analytic",
        "--model",
        "meta-llama/Llama-3.2-1B",
        "--gpu",
        "L40S",
        "--tp",
        "1",
        "--input-len",
        "256",
        "--output-len",
        "64",
        "--out",
        str(path),
        "--json",
    )
    assert out.returncode == 0, out.stderr
    profile = Profile.from_dict(json.loads(path.read_text()))
    assert profile.key.mix == "fixed-256-64" and profile.key.gpu_type == "L40S"
    assert profile.latency_at(profile.points[-1].rate) == profile.points[-1].mean_latency
    assert Profile.from_dict(json.loads(out.stdout)) == profile


def test_profile_from_a_trace_and_trace_stats(tmp_path: Path) -> None:
    # 20 requests: one call to "gen" (0-1 s), then 4 parallel calls to "rr" (1-1.5 s)
    calls = []
    for r in range(20):
        t = 10.0 * r
        calls.append(TraceCall("rag", f"r{r}", "g", "gen", t, t + 1.0, 300 + r, 50))
        calls += [
            TraceCall("rag", f"r{r}", f"k{i}", "rr", t + 1.0, t + 1.5, 100, 1) for i in range(4)
        ]
    trace = tmp_path / "t.jsonl"
    write_trace(trace, calls)
    stats = scepsy("trace", "stats", str(trace), "--json")
    assert stats.returncode == 0, stats.stderr
    doc = json.loads(stats.stdout)
    (wf,) = doc["workflows"]
    llms = {m["model"]: m for m in wf["llms"]}
    assert llms["gen"]["n"] == 1 and llms["gen"]["p"] == 1
    assert llms["rr"]["n"] == 4 and llms["rr"]["p"] == pytest.approx(4)
    prof = scepsy(
        "profile",
        "--model",
        "meta-llama/Llama-3.2-1B",
        "--gpu",
        "H100-SXM",
        "--trace",
        str(trace),
        "--trace-model",
        "rr",
        "--json",
    )
    assert prof.returncode == 0, prof.stderr
    assert json.loads(prof.stdout)["key"]["mix"].startswith("sample-")


def test_predict_example_spec() -> None:
    out = scepsy(
        "predict",
        "--spec",
        str(EXAMPLES / "spec-rag.yaml"),
        "--allocations",
        str(EXAMPLES / "allocations-rag.jsonl"),
        "--json",
    )
    assert out.returncode == 0, out.stderr
    first, second, third = json.loads(out.stdout)["predictions"]
    assert first["feasible"] and second["feasible"] and not third["feasible"]
    # more GPUs (TP 2, two generator replicas) give a lower predicted latency
    assert second["workflows"][0]["latency"] < first["workflows"][0]["latency"]
    assert "saturated" in third["reason"]


def test_predict_bad_allocation_line(tmp_path: Path) -> None:
    bad = tmp_path / "a.jsonl"
    bad.write_text('{"reranker": {"tp": 3}}\n')
    out = scepsy("predict", "--spec", str(EXAMPLES / "spec-rag.yaml"), "--allocations", str(bad))
    assert out.returncode == 2 and "line 1" in out.stderr
