"""Opt-in (``SCEPSY_GPU_TESTS=1`` on a host with an NVIDIA GPU and the CUDA ``vllm``): the agent's
launch line starts a real engine on GPU 0, as a placement of a whole GPU and of a half under MPS
would, and it answers. ``SCEPSY_GPU_TEST_MODEL`` names the weights (default a small HF model
already in the local cache; the engine runs with the Hub offline)."""

from __future__ import annotations

import json
import os
import shutil
import time
import urllib.request
from pathlib import Path

import pynvml
import pytest

from services.agent.sources import NvmlSource
from services.core.placement.rules import make_assignment
from services.core.serving import EngineIntent, engine_id
from services.core.workload.spec import ModelServing
from services.runtime.engines import LocalEngine, free_ports
from services.runtime.launch import LaunchHost, MpsDaemon, engine_spec

pytestmark = [pytest.mark.gpu, pytest.mark.timeout(900)]

MODEL = os.environ.get("SCEPSY_GPU_TEST_MODEL", "Qwen/Qwen2.5-0.5B-Instruct")


@pytest.mark.parametrize("units", [4, 2])
def test_agent_launch_line_runs_an_engine_on_a_gpu(units: int, tmp_path: Path) -> None:
    vllm = shutil.which("vllm")
    if vllm is None:
        pytest.skip("no CUDA vllm command on this GPU host")
    node = NvmlSource(pynvml, node_name="gpu-host").read()
    assignment = make_assignment("m", 0, node.name, (0,), units, 4, 0.05)
    serving = ModelServing("m", MODEL, "m", 2048, ())
    intent = EngineIntent(engine_id(serving, assignment), serving, assignment, 4, "gpu")
    host = LaunchHost(
        device="cuda", mps_pipe_dir=str(tmp_path / "mps"), mps_log_dir=str(tmp_path / "mpslog")
    )
    mps = MpsDaemon(host.mps_pipe_dir, host.mps_log_dir)
    if intent.shares_gpus:
        mps.start()
    engine = LocalEngine(
        engine_spec(intent, host, free_ports(1)[0]), tmp_path / "engine.log", vllm=Path(vllm)
    )
    try:
        engine.start()
        engine.wait_ready(time.monotonic() + 600)
        body = json.dumps({"model": "m", "prompt": "The capital of France is", "max_tokens": 4})
        request = urllib.request.Request(
            f"{engine.base_url}/v1/completions",
            data=body.encode(),
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(request, timeout=60) as reply:
            answer = json.load(reply)
        assert answer["usage"]["completion_tokens"] == 4
        used = pynvml.nvmlDeviceGetMemoryInfo(pynvml.nvmlDeviceGetHandleByIndex(0)).used
        total = node.gpus[0].memory_total_bytes
        assert used <= total * (assignment.memory_fraction + 0.05)  # the cap holds
    finally:
        engine.stop()
        mps.stop()
