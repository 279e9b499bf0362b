"""An engine confined to its cores (``EngineSpec.cpus``): every one of its processes, not only the
OpenMP threads, runs there; a core the host does not give us is refused before anything starts."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from services.core.errors import ConfigError
from services.runtime.engines import EngineSpec, LocalEngine, process_group_alive, run_engine_module


def test_cpus_must_name_cores() -> None:
    with pytest.raises(
        ConfigError, match=r"engine cpus: core numbers >= 0, at least one, got \(\)"
    ):
        EngineSpec.cpu("/models/tiny", "tiny", cpus=())
    with pytest.raises(ConfigError, match="engine cpus"):
        EngineSpec.cpu("/models/tiny", "tiny", cpus=(-1,))


def test_a_core_we_may_not_use_is_refused_before_the_engine_starts(tmp_path: Path) -> None:
    beyond = max(os.sched_getaffinity(0)) + 1
    spec = EngineSpec.cpu("/models/tiny", "tiny", cpus=(beyond,))
    engine = LocalEngine(spec, tmp_path / "engine.log", vllm=Path("/bin/false"))
    with pytest.raises(ConfigError, match=rf"engine cpus: \[{beyond}\] not among"):
        engine.start()
    assert engine.pid is None and not (tmp_path / "engine.log").exists()


def _allowed(pid: int) -> str:
    for line in (Path("/proc") / str(pid) / "status").read_text().splitlines():
        if line.startswith("Cpus_allowed_list:"):
            return line.split(":", 1)[1].strip()
    raise AssertionError(f"no Cpus_allowed_list for {pid}")


@pytest.mark.engine
@pytest.mark.slow
def test_every_process_of_a_confined_engine_runs_on_its_core(vllm: Path, tmp_path: Path) -> None:
    model = tmp_path / "tiny"
    run_engine_module("services.profiler.tiny_model", ["--out", str(model)])
    core = min(os.sched_getaffinity(0))
    spec = EngineSpec.cpu(model, "tiny", env={"VLLM_CPU_OMP_THREADS_BIND": str(core)}, cpus=(core,))
    engine = LocalEngine(spec, tmp_path / "engine.log", vllm=vllm)
    engine.start()
    try:
        engine.wait_ready(time.monotonic() + 300)
        assert engine.pid is not None
        pids = process_group_alive(engine.pid)
        # the API server and the engine core at least, each confined to the one core
        assert len(pids) >= 2
        assert {_allowed(pid) for pid in pids} == {str(core)}
        assert engine.healthy()
    finally:
        engine.stop()
