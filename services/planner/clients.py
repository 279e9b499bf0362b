"""The planner's clients of the Profiler and Placer services, as the plan path's plug-ins.

The search runs in a worker thread and asks for profiles and placements synchronously, so these
clients use blocking gRPC channels (one per client, opened lazily, closed by ``close``), every
call with a deadline. A domain error that crossed the wire is rebuilt from the status details
(``error_from_rpc``): a profile that does not fit raises ``InfeasibleError`` as in-process, and
the placer's refusal raises ``PlacementInfeasible`` with its kind, model and numbers, which
placement feedback turns into constraints. A service that does not answer within the deadline
raises ``UnavailableError`` naming it and its address.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping, Sequence
from typing import cast

import grpc

from protos.scepsy.v1 import (
    placer_pb2,
    placer_pb2_grpc,
    profiler_pb2,
    profiler_pb2_grpc,
    types_pb2,
)
from services.core.allocation import Allocation
from services.core.cluster.inventory import NodeInventory
from services.core.errors import UnavailableError
from services.core.placement.heuristic import Assignment, Placement
from services.core.planning.profiles import COMPUTED, STORED, Found, ProfileQuery
from services.runtime import channels
from services.runtime.convert import (
    allocation_to_pb,
    assignment_to_pb,
    model_to_pb,
    node_to_pb,
    placement_from_pb,
    profile_from_pb,
)
from services.runtime.errors import error_from_rpc


class _Channel:
    """One blocking channel to ``address``, opened on first use, safe across threads."""

    def __init__(self, service: str, address: str, timeout_s: float) -> None:
        self.service = service
        self.address = address
        self.timeout_s = timeout_s
        self._lock = threading.Lock()
        self._channel: grpc.Channel | None = None

    def get(self) -> grpc.Channel:
        with self._lock:
            if self._channel is None:
                self._channel = channels.channel(self.address)  # TLS as configured
            return self._channel

    def close(self) -> None:
        with self._lock:
            if self._channel is not None:
                self._channel.close()
                self._channel = None

    def failed(self, exc: grpc.RpcError) -> Exception:
        """The domain error of a failed call; UNAVAILABLE and deadlines name the service."""
        call = cast(grpc.Call, exc)  # what blocking stubs raise is both an error and a call
        code = call.code()
        if code is grpc.StatusCode.DEADLINE_EXCEEDED:
            return UnavailableError(
                f"{self.service} at {self.address} did not answer within {self.timeout_s:g} s"
            )
        if code is grpc.StatusCode.UNAVAILABLE:
            return UnavailableError(
                f"{self.service} at {self.address} is unavailable: {call.details()}"
            )
        return error_from_rpc(exc, target=f"{self.service} at {self.address}")


class ProfilerClient:
    """A ``ProfileProvider`` backed by the Profiler service (store first on its side)."""

    def __init__(self, address: str, timeout_s: float) -> None:
        self._channel = _Channel("profiler", address, timeout_s)

    def fetch(self, query: ProfileQuery) -> Found:
        mix = query.mix
        request = profiler_pb2.ProfileRequest(
            backend=query.backend,
            model=query.model.name,
            model_spec=model_to_pb(query.model),
            gpu_type=query.gpu.name,
            tp=query.tp,
            fraction=query.fraction,
            mix=profiler_pb2.RequestMixSpec(
                id=mix.id,
                prompt_tokens=[p for p, _ in mix.samples],
                completion_tokens=[c for _, c in mix.samples],
            ),
            seed=query.seed,
        )
        stub = profiler_pb2_grpc.ProfilerStub(self._channel.get())
        try:
            response = stub.Profile(request, timeout=self._channel.timeout_s)
        except grpc.RpcError as exc:
            raise self._channel.failed(exc) from None
        return Found(profile_from_pb(response.profile), STORED if response.cached else COMPUTED)

    def close(self) -> None:
        self._channel.close()


class PlacerClient:
    """Places allocations through the Placer service on ``nodes``, around ``running``."""

    def __init__(
        self,
        address: str,
        timeout_s: float,
        nodes: Sequence[NodeInventory],
        k: int,
        running: Sequence[Assignment] = (),
    ) -> None:
        self._channel = _Channel("placer", address, timeout_s)
        self._nodes = [node_to_pb(n) for n in nodes]
        self._k = k
        self._current = types_pb2.Placement(
            assignments=[assignment_to_pb(a) for a in running], fraction_unit=k
        )
        self.calls = 0

    def place(self, allocation: Mapping[str, Allocation]) -> Placement:
        """The placement of ``allocation`` (a ``PlaceFn``); raises ``PlacementInfeasible``."""
        request = placer_pb2.PlaceRequest(
            allocation=allocation_to_pb(allocation, self._k),
            nodes=self._nodes,
            current=self._current,
        )
        stub = placer_pb2_grpc.PlacerStub(self._channel.get())
        self.calls += 1
        try:
            response = stub.Place(request, timeout=self._channel.timeout_s)
        except grpc.RpcError as exc:
            raise self._channel.failed(exc) from None
        return placement_from_pb(response.placement, self._k)

    def close(self) -> None:
        self._channel.close()
