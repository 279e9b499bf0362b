"""How a placed engine is launched: its exact ``vllm serve`` command line and environment.

One function, ``engine_spec``, turns an ``EngineIntent`` (what the plan asks for on this node) into
an ``EngineSpec`` (``services.runtime.engines``), for the two kinds of hosts:

- **GPU hosts** (``device="cuda"``): ``CUDA_VISIBLE_DEVICES`` = the assignment's GPUs in PCI bus
  order (``CUDA_DEVICE_ORDER=PCI_BUS_ID``, so indices are NVML's), ``--tensor-parallel-size``,
  ``--gpu-memory-utilization`` = the placement's memory cap. An engine that shares its GPUs runs
  under NVIDIA MPS with ``CUDA_MPS_ACTIVE_THREAD_PERCENTAGE`` = its compute share; ``MpsDaemon``
  runs the node's control daemon while any engine shares a GPU.
- **CPU hosts** (``device="cpu"``, the ``cpu`` GPU type: tests, the demo): vLLM CPU engines. Each
  declared ``cpu`` device stands for an equal slice of the host's cores; the memory cap sets the
  KV cache space (``VLLM_CPU_KVCACHE_SPACE``, GiB of the device's memory) and the compute share
  the cores the engine's threads bind to (``VLLM_CPU_OMP_THREADS_BIND``), so engines sharing a
  host do not fight over the same cores. Every process of the engine (API server, engine core,
  tokenizer threads) is confined to those cores too (``EngineSpec.cpus``): with only the OpenMP
  threads bound, the rest floats onto a neighbour's cores and one engine ran 0.5-0.9 cores while
  its neighbour took 1.0-1.4 (``scripts/bench_validate.py`` host report).

Every engine gets ``--shutdown-timeout``: on SIGTERM vLLM waits at most that long for running
requests, then aborts them and closes their streams (the agent drains an engine before it stops
it, so this bounds only what the drain did not finish).
"""

from __future__ import annotations

import contextlib
import math
import os
import shutil
import subprocess
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from services.core.errors import ConfigError, UnavailableError
from services.core.serving import EngineIntent
from services.runtime.engines import CPU_ENV, EngineSpec

DEVICES = ("cuda", "cpu")
MPS_CONTROL = "nvidia-cuda-mps-control"


@dataclass(frozen=True, slots=True)
class LaunchHost:
    """What the agent knows about its host that decides how engines run on it."""

    device: str  # "cuda" or "cpu"
    engine_host: str = "127.0.0.1"  # address engines bind
    cpus: tuple[int, ...] = ()  # host cores engines may use (cpu device)
    devices: int = 1  # declared devices of the node (cpu device: slices of ``cpus``)
    device_memory_gib: float = 1.0  # memory of one device (cpu device: KV cache budget)
    mps_pipe_dir: str = "/tmp/nvidia-mps"
    mps_log_dir: str = "/tmp/nvidia-log"
    shutdown_timeout_s: int = 5

    def __post_init__(self) -> None:
        if self.device not in DEVICES:
            raise ConfigError(f"device: must be one of {', '.join(DEVICES)}, got {self.device!r}")
        if self.devices < 1:
            raise ConfigError(f"devices: must be >= 1, got {self.devices}")
        if self.device == "cpu" and not self.cpus:
            raise ConfigError("cpus: a cpu host needs at least one core")


def device_of(gpu_type: str) -> str:
    return "cpu" if gpu_type == "cpu" else "cuda"


def device_cores(host: LaunchHost, device: int) -> tuple[int, ...]:
    """The host cores that ``cpu`` device ``device`` stands for (an equal slice, at least one)."""
    n = len(host.cpus)
    if host.devices >= n:
        return (host.cpus[device % n],)
    lo, hi = device * n // host.devices, (device + 1) * n // host.devices
    return host.cpus[lo:hi]


def cpu_binding(intent: EngineIntent, host: LaunchHost, slot: int) -> tuple[tuple[int, ...], ...]:
    """The cores each tensor-parallel rank of a cpu engine binds to.

    ``slot`` is the engine's first unit on its device (units ``slot .. slot+units-1`` of ``k``,
    free among the engines on it); the engine gets the matching share of the device's cores, at
    least one core.
    """
    k = intent.fraction_unit
    units = intent.assignment.units
    ranks = []
    for device in intent.assignment.gpus:
        cores = device_cores(host, device)
        m = len(cores)
        lo = min(m - 1, slot * m // k)
        hi = max(lo + 1, (slot + units) * m // k)
        ranks.append(cores[lo:hi])
    return tuple(ranks)


def engine_spec(intent: EngineIntent, host: LaunchHost, port: int, cpu_slot: int = 0) -> EngineSpec:
    """The ``vllm serve`` spec of ``intent`` on ``host``, listening on ``port``."""
    serving = intent.serving
    a = intent.assignment
    extra = (*serving.engine_args, "--shutdown-timeout", str(host.shutdown_timeout_s))
    if host.device == "cpu":
        ranks = cpu_binding(intent, host, cpu_slot)
        kv_gib = max(1, math.floor(a.memory_fraction * host.device_memory_gib))
        env = dict(CPU_ENV)
        env["VLLM_CPU_KVCACHE_SPACE"] = str(kv_gib)
        env["VLLM_CPU_OMP_THREADS_BIND"] = "|".join(",".join(map(str, r)) for r in ranks)
        if _shares_cores(intent, host):
            # OpenMP threads that spin while waiting starve another engine on the same core
            env["OMP_WAIT_POLICY"] = "PASSIVE"
        return EngineSpec(
            model=serving.weights,
            served_model_name=serving.served_name,
            host=host.engine_host,
            port=port,
            dtype="float32",
            max_model_len=serving.max_model_len,
            tensor_parallel_size=a.tp,
            enforce_eager=True,
            extra_args=extra,
            env=tuple(sorted(env.items())),
            cpus=tuple(sorted({c for rank in ranks for c in rank})),
        )
    env = {"CUDA_DEVICE_ORDER": "PCI_BUS_ID"}
    if intent.shares_gpus:
        env.update(
            {
                "CUDA_MPS_ACTIVE_THREAD_PERCENTAGE": str(a.mps_percentage),
                "CUDA_MPS_PIPE_DIRECTORY": host.mps_pipe_dir,
                "CUDA_MPS_LOG_DIRECTORY": host.mps_log_dir,
            }
        )
    return EngineSpec(
        model=serving.weights,
        served_model_name=serving.served_name,
        host=host.engine_host,
        port=port,
        max_model_len=serving.max_model_len,
        gpu_memory_utilization=a.memory_fraction,
        tensor_parallel_size=a.tp,
        cuda_visible_devices=a.gpus,
        extra_args=extra,
        env=tuple(sorted(env.items())),
    )


def _shares_cores(intent: EngineIntent, host: LaunchHost) -> bool:
    """Whether a cpu engine's cores may run another engine too: a share of a device, or more
    devices than cores."""
    return intent.shares_gpus or host.devices > len(host.cpus)


class MpsDaemon:
    """The node's NVIDIA MPS control daemon, run while any engine shares a GPU.

    ``control`` is the ``nvidia-cuda-mps-control`` command: ``start`` runs ``control -d`` (it
    daemonises) with the pipe and log directories in its environment; ``stop`` writes ``quit`` to
    ``control``'s standard input, which ends the daemon once its clients are gone.
    """

    def __init__(
        self,
        pipe_dir: str,
        log_dir: str,
        control: str = MPS_CONTROL,
        environ: Mapping[str, str] | None = None,
        timeout_s: float = 10.0,
    ) -> None:
        self._pipe_dir = pipe_dir
        self._log_dir = log_dir
        self._control = control
        self._environ = environ
        self._timeout_s = timeout_s
        self.running = False

    def _env(self) -> dict[str, str]:
        env = dict(os.environ if self._environ is None else self._environ)
        env["CUDA_MPS_PIPE_DIRECTORY"] = self._pipe_dir
        env["CUDA_MPS_LOG_DIRECTORY"] = self._log_dir
        return env

    def _run(self, args: Sequence[str], stdin: str | None = None) -> None:
        executable = shutil.which(self._control) or self._control
        try:
            done = subprocess.run(
                [executable, *args],
                input=stdin,
                env=self._env(),
                capture_output=True,
                text=True,
                timeout=self._timeout_s,
                check=False,
            )
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise UnavailableError(f"mps: {self._control} {' '.join(args)}: {exc}") from exc
        if done.returncode != 0:
            raise UnavailableError(
                f"mps: {self._control} {' '.join(args)} exited {done.returncode}: "
                f"{(done.stderr or done.stdout).strip()[-500:]}"
            )

    def start(self) -> None:
        if self.running:
            return
        for directory in (self._pipe_dir, self._log_dir):
            Path(directory).mkdir(parents=True, exist_ok=True)
        self._run(["-d"])
        self.running = True

    def stop(self) -> None:
        if not self.running:
            return
        with contextlib.suppress(UnavailableError):
            self._run([], stdin="quit\n")
        self.running = False
