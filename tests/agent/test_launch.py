"""How placed engines are launched: GPU hosts (recorded H100 and A100 machines, no GPU needed:
the command line and environment are checked against the placement) and CPU hosts."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from services.agent.fake_nvml import FakeNvml
from services.agent.sources import NvmlSource
from services.core.allocation import Allocation
from services.core.errors import ConfigError, UnavailableError
from services.core.placement.heuristic import place_allocation
from services.core.serving import EngineIntent, engine_id
from services.core.workload.spec import ModelServing
from services.runtime.launch import (
    LaunchHost,
    MpsDaemon,
    cpu_binding,
    device_cores,
    engine_spec,
)

K = 4
GPU_HOST = LaunchHost(device="cuda", engine_host="0.0.0.0", mps_pipe_dir="/p", mps_log_dir="/l")


def _flag(argv: list[str], name: str) -> str | None:
    return argv[argv.index(name) + 1] if name in argv else None


@pytest.mark.parametrize(
    ("recording", "allocation"),
    [
        (
            "dgx-h100-nvswitch",
            {
                "gen": Allocation(1.0, 4, 1),
                "prm": Allocation(1.0, 2, 1),
                "rerank": Allocation(0.25, 1, 3),
                "small": Allocation(0.5, 1, 2),
            },
        ),
        (
            "a100-pcie-nvlink-pairs",
            {"gen": Allocation(1.0, 2, 1), "rerank": Allocation(0.5, 1, 3)},
        ),
    ],
)
def test_gpu_engines_follow_their_placement(
    recording: str, allocation: dict[str, Allocation]
) -> None:
    node = NvmlSource(FakeNvml.recorded(recording), node_name="n1", hostname="h").read()
    placement = place_allocation(allocation, K, [node]).placement
    assert placement.assignments
    for a in placement.assignments:
        serving = ModelServing(a.model, f"/models/{a.model}", a.model, 4096, ("--seed", "1"))
        intent = EngineIntent(engine_id(serving, a), serving, a, K, node.gpus[0].gpu_type)
        spec = engine_spec(intent, GPU_HOST, 8000)
        argv = spec.argv("vllm")
        env = spec.environment({})
        assert argv[:3] == ["vllm", "serve", f"/models/{a.model}"]
        assert _flag(argv, "--served-model-name") == a.model
        assert (_flag(argv, "--host"), _flag(argv, "--port")) == ("0.0.0.0", "8000")
        assert env["CUDA_VISIBLE_DEVICES"] == ",".join(map(str, a.gpus))
        assert env["CUDA_DEVICE_ORDER"] == "PCI_BUS_ID"  # NVML's indices
        assert int(_flag(argv, "--tensor-parallel-size") or 1) == len(a.gpus)
        assert float(_flag(argv, "--gpu-memory-utilization") or 0) == a.memory_fraction
        assert _flag(argv, "--max-model-len") == "4096" and "--seed" in argv
        assert _flag(argv, "--shutdown-timeout") == str(GPU_HOST.shutdown_timeout_s)
        assert "--dtype" not in argv and "--enforce-eager" not in argv  # CPU-only choices
        assert spec.cpus is None  # a GPU engine's processes are not confined to cores
        if a.units < K:  # a share of a GPU runs under MPS with its compute share
            assert env["CUDA_MPS_ACTIVE_THREAD_PERCENTAGE"] == str(a.mps_percentage)
            assert a.mps_percentage == round(100 * a.units / K)
            assert (env["CUDA_MPS_PIPE_DIRECTORY"], env["CUDA_MPS_LOG_DIRECTORY"]) == ("/p", "/l")
        else:
            assert not any(key.startswith("CUDA_MPS") for key in env)


def test_cpu_engines_get_their_cores_and_kv_space() -> None:
    host = LaunchHost(device="cpu", cpus=(0, 1, 2, 3, 4, 5, 6, 7), devices=2, device_memory_gib=8)
    assert device_cores(host, 0) == (0, 1, 2, 3) and device_cores(host, 1) == (4, 5, 6, 7)
    serving = ModelServing("m", "/models/tiny", "m", 256, ())

    def cpu_intent(gpus: tuple[int, ...], units: int, memory: float) -> EngineIntent:
        from services.core.placement.rules import Assignment

        a = Assignment("m", 0, "local", gpus, units, round(100 * units / K), memory)
        return EngineIntent(engine_id(serving, a), serving, a, K, "cpu")

    half = cpu_intent((1,), 2, 0.475)
    assert cpu_binding(half, host, slot=0) == ((4, 5),)
    assert cpu_binding(half, host, slot=2) == ((6, 7),)
    spec = engine_spec(half, host, 9000, cpu_slot=2)
    env = spec.environment({})
    assert env["VLLM_CPU_OMP_THREADS_BIND"] == "6,7" and spec.cpus == (6, 7)
    assert env["VLLM_CPU_KVCACHE_SPACE"] == "3"  # floor(0.475 x 8 GiB)
    assert env["OMP_WAIT_POLICY"] == "PASSIVE"  # a half device: its cores are shared
    assert tuple(spec.argv()[spec.argv().index("--dtype") :][:2]) == ("--dtype", "float32")
    assert "--enforce-eager" in spec.argv() and "CUDA_VISIBLE_DEVICES" not in env
    # TP over two devices: one core list per rank; a small share still gets a core
    two = cpu_intent((0, 1), 4, 0.95)
    assert "OMP_WAIT_POLICY" not in engine_spec(two, host, 9001).environment({})
    assert engine_spec(two, host, 9001).environment({})["VLLM_CPU_OMP_THREADS_BIND"] == (
        "0,1,2,3|4,5,6,7"
    )
    assert engine_spec(two, host, 9001).cpus == (0, 1, 2, 3, 4, 5, 6, 7)  # every rank's cores
    tiny_share = cpu_intent((0,), 1, 0.2)
    small_host = LaunchHost(device="cpu", cpus=(0, 1), devices=1, device_memory_gib=1)
    assert cpu_binding(tiny_share, small_host, slot=3) == ((1,),)
    assert engine_spec(tiny_share, small_host, 1).environment({})["VLLM_CPU_KVCACHE_SPACE"] == "1"
    # more devices than cores: each device is one core, shared
    crowded = LaunchHost(device="cpu", cpus=(0, 1), devices=3)
    assert [device_cores(crowded, d) for d in range(3)] == [(0,), (1,), (0,)]


def test_launch_host_refuses_bad_settings() -> None:
    with pytest.raises(ConfigError, match="device: must be one of cuda, cpu, got 'tpu'"):
        LaunchHost(device="tpu")
    with pytest.raises(ConfigError, match="cpus: a cpu host needs at least one core"):
        LaunchHost(device="cpu")


def _fake_mps_control(tmp_path: Path, exit_code: int = 0) -> tuple[Path, Path]:
    """A stand-in for nvidia-cuda-mps-control (no GPU here): records its calls."""
    calls = tmp_path / "calls.txt"
    script = tmp_path / "nvidia-cuda-mps-control"
    script.write_text(
        "#!/bin/sh\n"
        f'echo "args=$* pipe=$CUDA_MPS_PIPE_DIRECTORY log=$CUDA_MPS_LOG_DIRECTORY '
        f'stdin=$(cat)" >> {calls}\n'
        f"exit {exit_code}\n"
    )
    script.chmod(script.stat().st_mode | stat.S_IEXEC)
    return script, calls


def test_mps_daemon_starts_once_and_quits(tmp_path: Path) -> None:
    script, calls = _fake_mps_control(tmp_path)
    mps = MpsDaemon(str(tmp_path / "pipe"), str(tmp_path / "log"), str(script), dict(os.environ))
    mps.start()
    mps.start()  # already running: no second daemon
    assert mps.running and (tmp_path / "pipe").is_dir() and (tmp_path / "log").is_dir()
    mps.stop()
    mps.stop()
    lines = calls.read_text().splitlines()
    assert len(lines) == 2
    assert lines[0].startswith(f"args=-d pipe={tmp_path / 'pipe'} log={tmp_path / 'log'}")
    assert lines[1].endswith("stdin=quit")
    assert not mps.running


def test_mps_daemon_failure_is_a_clear_error(tmp_path: Path) -> None:
    script, _ = _fake_mps_control(tmp_path, exit_code=3)
    mps = MpsDaemon(str(tmp_path / "p"), str(tmp_path / "l"), str(script))
    with pytest.raises(UnavailableError, match=r"mps: .* -d exited 3"):
        mps.start()
    assert not mps.running
    missing = MpsDaemon(str(tmp_path / "p"), str(tmp_path / "l"), str(tmp_path / "absent"))
    with pytest.raises(UnavailableError, match=r"mps: .*absent"):
        missing.start()
