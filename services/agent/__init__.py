"""The node agent: one per host. Reports GPU inventory and interconnect topology (through NVML, or
from a declared cluster file on GPU-less hosts), registers the node in Redis with a heartbeat TTL,
and serves the ``scepsy.v1.NodeAgent`` gRPC service."""
