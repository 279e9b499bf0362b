"""The node agent's configuration."""

from __future__ import annotations

import socket
from dataclasses import dataclass

from services.core.errors import ConfigError
from services.runtime.config import ServiceConfig, in_range, option, positive


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
    advertise_host: str = option("", "host other machines use to reach this agent (default: host)")

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
