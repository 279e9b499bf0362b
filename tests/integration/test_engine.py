"""Real vLLM CPU engines: start, serve the tiny random Llama, match transformers, stop cleanly.

The engine venv (``make engine-venv``) runs vLLM and transformers. Without it the engine tests are
skipped locally, but fail under CI (env ``CI`` set), where they must run. ``EngineSpec`` command
lines are checked without an engine.
"""

from __future__ import annotations

import json
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from services.core.errors import ConfigError, UnavailableError
from services.runtime.engines import (
    EngineSpec,
    LocalEngine,
    port_is_free,
    run_engine_module,
    start_engines,
    stop_engines,
)

pytestmark = pytest.mark.engine

TINY_MODEL = "services.profiler.tiny_model"
PROMPT = "What is the capital of France?"
MAX_TOKENS = 8
_HTTP = urllib.request.build_opener(urllib.request.ProxyHandler({}))


# ------------------------------------------------------------------------ command lines, no engine
def test_cpu_spec_command_line_and_environment() -> None:
    spec = EngineSpec.cpu(
        "/models/tiny", "tiny", port=8001, max_num_seqs=4, extra_args=["--seed", "1"]
    )
    assert spec.argv("/venv/bin/vllm") == [
        "/venv/bin/vllm", "serve", "/models/tiny",
        "--served-model-name", "tiny", "--host", "127.0.0.1", "--port", "8001",
        "--dtype", "float32", "--max-model-len", "256", "--max-num-seqs", "4",
        "--enforce-eager", "--seed", "1",
    ]  # fmt: skip
    env = spec.environment({"PATH": "/bin", "HF_HUB_OFFLINE": "0"})
    assert env == {"PATH": "/bin", "HF_HUB_OFFLINE": "1", "VLLM_CPU_KVCACHE_SPACE": "1"}


def test_gpu_spec_has_no_cpu_flags_and_pins_devices() -> None:
    spec = EngineSpec(
        model="meta-llama/Llama-3.1-8B-Instruct",
        served_model_name="llama-8b",
        host="0.0.0.0",
        port=8000,
        gpu_memory_utilization=0.45,
        tensor_parallel_size=2,
        cuda_visible_devices=(2, 3),
    )
    assert spec.argv() == [
        "vllm", "serve", "meta-llama/Llama-3.1-8B-Instruct",
        "--served-model-name", "llama-8b", "--host", "0.0.0.0", "--port", "8000",
        "--gpu-memory-utilization", "0.45", "--tensor-parallel-size", "2",
    ]  # fmt: skip
    assert spec.environment({})["CUDA_VISIBLE_DEVICES"] == "2,3"


@pytest.mark.parametrize(
    ("field", "changes"),
    [
        ("port", {"port": 70000}),
        ("tensor_parallel_size", {"tensor_parallel_size": 0}),
        ("gpu_memory_utilization", {"gpu_memory_utilization": 1.5}),
        ("max_model_len", {"max_model_len": 0}),
        ("served_model_name", {"served_model_name": ""}),
        ("cuda_visible_devices", {"cuda_visible_devices": (0,), "tensor_parallel_size": 2}),
    ],
)
def test_spec_rejects_bad_field(field: str, changes: dict[str, Any]) -> None:
    with pytest.raises(ConfigError, match=field):
        EngineSpec(**{"model": "m", "served_model_name": "m", **changes})


# ------------------------------------------------------------------------------- real engines
@pytest.fixture(scope="session")
def tiny_model(vllm: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("models") / "tiny"
    result = run_engine_module(TINY_MODEL, ["--out", str(out)])
    assert result["built"] and result["vocab_size"] >= 10_000
    return out


@pytest.fixture(scope="module")
def engines(
    vllm: Path, tiny_model: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[list[LocalEngine]]:
    """Two replicas started concurrently: one to query, one for the stop test."""
    spec = EngineSpec.cpu(tiny_model, "tiny")
    started = start_engines(
        spec, 2, tmp_path_factory.mktemp("engine-logs"), timeout_s=240, vllm=vllm
    )
    yield started
    stop_engines(started)


def _post(url: str, body: dict[str, Any]) -> dict[str, Any]:
    request = urllib.request.Request(
        url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
    )
    with _HTTP.open(request, timeout=60) as reply:
        result: dict[str, Any] = json.load(reply)
    return result


def _group_alive(pgid: int) -> list[int]:
    """PIDs of the process group that still run (zombies, left for a non-reaping PID 1, do not)."""
    alive = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        state, pgrp = fields[0], int(fields[2])
        if pgrp == pgid and state != "Z":
            alive.append(int(entry.name))
    return alive


def test_greedy_output_equals_transformers(engines: list[LocalEngine], tiny_model: Path) -> None:
    reply = _post(
        f"{engines[0].base_url}/v1/completions",
        {
            "model": "tiny",
            "prompt": PROMPT,
            "max_tokens": MAX_TOKENS,
            "temperature": 0,
            "return_token_ids": True,
        },
    )
    expected = run_engine_module(
        TINY_MODEL,
        ["--out", str(tiny_model), "--generate", PROMPT, "--max-tokens", str(MAX_TOKENS)],
    )
    choice = reply["choices"][0]
    assert choice["prompt_token_ids"] == expected["prompt_token_ids"]
    assert choice["token_ids"] == expected["token_ids"]
    assert len(choice["token_ids"]) == MAX_TOKENS
    assert choice["text"] == expected["text"]


def test_models_lists_served_name(engines: list[LocalEngine]) -> None:
    with _HTTP.open(f"{engines[0].base_url}/v1/models", timeout=10) as reply:
        models = json.load(reply)
    assert [m["id"] for m in models["data"]] == ["tiny"]


def test_chat_template_serves_chat_completions(engines: list[LocalEngine]) -> None:
    reply = _post(
        f"{engines[0].base_url}/v1/chat/completions",
        {
            "model": "tiny",
            "messages": [{"role": "user", "content": "Hello"}],
            "max_tokens": 4,
            "temperature": 0,
            "ignore_eos": True,
        },
    )
    assert reply["usage"]["completion_tokens"] == 4


def test_stop_ends_every_process_and_frees_the_port(engines: list[LocalEngine]) -> None:
    engine = engines[1]
    pid, port = engine.pid, engine.spec.port
    assert pid is not None and engine.healthy()
    assert len(_group_alive(pid)) >= 2  # the API server and its engine core, at least

    started = time.monotonic()
    engine.stop()
    assert time.monotonic() - started < 15  # SIGTERM was enough: no SIGKILL grace expired

    assert not engine.running()
    assert _group_alive(pid) == []
    assert port_is_free(port)
    assert engines[0].healthy()  # the other replica is untouched


def test_start_failure_reports_the_log(vllm: Path, tmp_path: Path) -> None:
    spec = EngineSpec.cpu(tmp_path / "no-such-model", "missing")
    engine = LocalEngine(spec, tmp_path / "missing.log", vllm=vllm)
    engine.start()
    with pytest.raises(
        UnavailableError, match=r"exited with code \d+ before becoming healthy"
    ) as info:
        engine.wait_ready(time.monotonic() + 120)
    assert "no-such-model" in str(info.value).split("log ", 1)[1]  # the log's tail is quoted
    assert not engine.running()
