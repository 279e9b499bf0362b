"""The placer's refusals as data over a real gRPC channel (port 0): a client rebuilds the same
``PlacementInfeasible`` the core raises in process, and a malformed request names its field."""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping

import grpc
import pytest
from google.rpc import error_details_pb2, status_pb2

from protos.scepsy.v1 import placer_pb2, placer_pb2_grpc
from protos.scepsy.v1 import types_pb2 as pb
from services.agent.fake_nvml import FakeNvml
from services.agent.sources import NvmlSource
from services.core import errors
from services.core.allocation import Allocation
from services.core.cluster.declared import parse_cluster
from services.core.cluster.inventory import NodeInventory
from services.core.placement.heuristic import place_allocation
from services.core.placement.rules import InfeasibleKind, PlacementInfeasible
from services.placer.config import PlacerConfig
from services.placer.service import Placer, placer_binding
from services.runtime.convert import allocation_to_pb, node_to_pb
from services.runtime.errors import DETAILS_KEY, error_from_rpc
from services.runtime.server import Server
from services.runtime.store import Store

H100S = parse_cluster(
    {"version": 1, "nodes": [{"name": "h", "gpu_type": "H100-SXM", "gpus": 8, "count": 2}]}
)


@pytest.fixture
async def stub(redis_url: str, store: Store) -> AsyncIterator[placer_pb2_grpc.PlacerStub]:
    config = PlacerConfig(redis_url=redis_url, drain_s=0.0, grace_s=1.0)
    server = Server(config, [placer_binding(Placer(config, store))])
    await server.start()
    async with grpc.aio.insecure_channel(server.address) as channel:
        yield placer_pb2_grpc.PlacerStub(channel)
    await server.stop()


def in_process(
    allocation: Mapping[str, Allocation], nodes: list[NodeInventory]
) -> PlacementInfeasible:
    with pytest.raises(PlacementInfeasible) as caught:
        place_allocation(allocation, 4, nodes)
    return caught.value


async def refusal(
    stub: placer_pb2_grpc.PlacerStub,
    allocation: Mapping[str, Allocation],
    nodes: list[NodeInventory],
) -> grpc.aio.AioRpcError:
    request = placer_pb2.PlaceRequest(
        allocation=allocation_to_pb(allocation, 4), nodes=[node_to_pb(n) for n in nodes]
    )
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.Place(request, timeout=5)
    return err.value


@pytest.mark.parametrize(
    ("allocation", "nodes", "kind", "model", "needed", "available"),
    [
        # TP 8 on a node whose NVLink domains are pairs: needs 8, the largest domain has 2
        (
            {"wide": Allocation(1.0, 8, 1)},
            "a100",
            InfeasibleKind.TP_EXCEEDS_DOMAIN,
            "wide",
            8.0,
            2.0,
        ),
        # 20 whole GPUs on 2 x 8 H100s
        (
            {"many": Allocation(1.0, 1, 20)},
            "h100s",
            InfeasibleKind.NOT_ENOUGH_GPUS,
            "",
            20.0,
            16.0,
        ),
    ],
)
async def test_refusal_rebuilds_into_the_in_process_error(
    stub: placer_pb2_grpc.PlacerStub,
    allocation: Mapping[str, Allocation],
    nodes: str,
    kind: InfeasibleKind,
    model: str,
    needed: float,
    available: float,
) -> None:
    cluster = (
        [NvmlSource(FakeNvml.recorded("a100-pcie-nvlink-pairs"), "a100").read()]
        if nodes == "a100"
        else list(H100S)
    )
    local = in_process(allocation, cluster)
    err = await refusal(stub, allocation, cluster)
    assert (err.code(), err.details()) == (grpc.StatusCode.FAILED_PRECONDITION, str(local))
    remote = error_from_rpc(err, target="placer")
    assert isinstance(remote, PlacementInfeasible)
    assert (remote.kind, remote.model, remote.needed, remote.available) == (
        kind,
        model,
        needed,
        available,
    )
    assert (local.kind, local.model, local.needed, local.available) == (
        remote.kind,
        remote.model,
        remote.needed,
        remote.available,
    )
    assert (str(remote), remote.reason, remote.field, dict(remote.details)) == (
        str(local),
        local.reason,
        local.field,
        dict(local.details),
    )


async def test_malformed_allocation_names_its_field(stub: placer_pb2_grpc.PlacerStub) -> None:
    bad = pb.Allocation(
        fraction_unit=4, llms=[pb.LlmAllocation(model="m", fraction_units=5, tp=1, replicas=1)]
    )
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.Place(placer_pb2.PlaceRequest(allocation=bad), timeout=5)
    err = caught.value
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    raw = dict(err.trailing_metadata() or ())[DETAILS_KEY]
    assert isinstance(raw, bytes)
    violations = []
    for detail in status_pb2.Status.FromString(raw).details:
        bad_request = error_details_pb2.BadRequest()
        if detail.Unpack(bad_request):
            violations.extend(v.field for v in bad_request.field_violations)
    assert violations == ["allocation.llms[0].fraction_units"]
    remote = error_from_rpc(err)
    assert isinstance(remote, errors.InvalidInputError)
    assert (remote.field, remote.value) == ("allocation.llms[0].fraction_units", "5")
