"""Where a node's inventory comes from: NVML on GPU hosts, a declared cluster file elsewhere."""

from __future__ import annotations

import socket
from typing import Any, Protocol

from services.agent.nvml_reader import read_node
from services.core.cluster.declared import load_cluster
from services.core.cluster.inventory import NodeInventory
from services.core.errors import ConfigError, UnavailableError


class InventorySource(Protocol):
    def read(self) -> NodeInventory:
        """The node now (free memory is read at call time where the source can)."""
        ...

    def close(self) -> None: ...


class NvmlSource:
    """Reads through an NVML binding: the ``pynvml`` module, or ``FakeNvml`` in tests."""

    def __init__(self, nvml: Any, node_name: str, hostname: str | None = None) -> None:
        try:
            nvml.nvmlInit()
        except nvml.NVMLError as exc:
            raise UnavailableError(
                f"NVML is not available on this host ({exc}); on a GPU-less host run the agent "
                "from a declared inventory: --cluster FILE --node-name NAME"
            ) from exc
        self._nvml = nvml
        self._node_name = node_name
        self._hostname = hostname or socket.gethostname()

    def read(self) -> NodeInventory:
        return read_node(self._nvml, node_name=self._node_name, hostname=self._hostname)

    def close(self) -> None:
        self._nvml.nvmlShutdown()


class DeclaredSource:
    """One node of a cluster YAML (see services.core.cluster.declared)."""

    def __init__(self, node: NodeInventory) -> None:
        self._node = node

    @classmethod
    def from_file(cls, path: str, node_name: str) -> DeclaredSource:
        nodes = {n.name: n for n in load_cluster(path)}
        if node_name not in nodes:
            raise ConfigError(
                f"node_name: {node_name!r} is not a node of {path} (nodes: {', '.join(nodes)})"
            )
        return cls(nodes[node_name])

    def read(self) -> NodeInventory:
        return self._node

    def close(self) -> None:
        return None


def open_source(cluster: str, node_name: str, nvml: Any | None = None) -> InventorySource:
    if cluster:
        return DeclaredSource.from_file(cluster, node_name)
    if nvml is None:
        import pynvml

        nvml = pynvml
    return NvmlSource(nvml, node_name)
