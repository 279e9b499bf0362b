"""The node agent's configuration."""

from __future__ import annotations

import socket
from dataclasses import dataclass

from services.core.errors import ConfigError
from services.runtime.config import ServiceConfig, in_range, one_of, option, positive


@dataclass(frozen=True)
class AgentConfig(ServiceConfig):
    """Node agent: reports this host's GPUs and topology, heartbeats it into Redis."""

    node_name: str = option("", "node name in the cluster (default: the host name)")
    cluster: str = option(
        "", "declared cluster YAML: run from a declared inventory instead of NVML (GPU-less hosts)"
    )
    heartbeat_s: float = option(2.0, "seconds between heartbeats", in_range(0.05, 3600))
    node_ttl_s: float = option(
        10.0, "a node disappears this long after its last heartbeat", positive
    )
    advertise_host: str = option(
        "", "host other machines use to reach this agent and its engines (default: host)"
    )
    engines: str = option(
        "auto",
        "run the engines the current plan places on this node: on, off, or auto (on unless the "
        "inventory is declared GPUs that are not here)",
        one_of("auto", "on", "off"),
    )
    vllm: str = option(
        "", "the vllm command (default: $SCEPSY_ENGINE_VENV/bin/vllm, else vllm on PATH)"
    )
    engine_host: str = option("127.0.0.1", "address engines bind (0.0.0.0 in containers)")
    engine_port_base: int = option(
        0, "engines listen on this port and the next 63 (0: free ports)", in_range(0, 65472)
    )
    engine_dir: str = option(
        "", "engine logs and the agent's engine state (default: $SCEPSY_HOME/engines/NODE)"
    )
    engine_start_timeout_s: float = option(
        600.0, "an engine not healthy this long after its start is failed", positive
    )
    engine_drain_timeout_s: float = option(
        30.0, "longest wait for a draining engine's calls before it is stopped", in_range(0, 3600)
    )
    resync_s: float = option(
        5.0, "seconds between reads of the current plan besides its change events", positive
    )
    mps_pipe_dir: str = option("/tmp/nvidia-mps", "NVIDIA MPS pipe directory (GPU hosts)")
    mps_log_dir: str = option("/tmp/nvidia-log", "NVIDIA MPS log directory (GPU hosts)")
    mps_control: str = option(
        "nvidia-cuda-mps-control", "the MPS control command (GPU hosts sharing GPUs)"
    )

    def validate(self) -> None:
        super().validate()
        if self.node_ttl_s < 2 * self.heartbeat_s:
            raise ConfigError(
                f"node_ttl_s: must be at least twice heartbeat_s ({self.heartbeat_s}), "
                f"got {self.node_ttl_s}"
            )

    @property
    def resolved_node_name(self) -> str:
        return self.node_name or socket.gethostname()
