"""The profiler service over real gRPC with profiles stored in a real Redis."""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc
import pytest

from protos.scepsy.v1 import profiler_pb2, profiler_pb2_grpc
from protos.scepsy.v1 import types_pb2 as pb
from services.profiler.service import profiler_binding
from services.runtime.config import ServiceConfig
from services.runtime.server import Server
from services.runtime.store import Store

FIXED = profiler_pb2.RequestMixSpec(input_len=512, output_len=128)


async def start(store: Store, redis_url: str) -> tuple[Server, grpc.aio.Channel]:
    server = Server(
        ServiceConfig(redis_url=redis_url, drain_s=0, grace_s=1), [profiler_binding(store)]
    )
    await server.start()
    return server, grpc.aio.insecure_channel(server.address)


@pytest.fixture
async def stub(store: Store, redis_url: str) -> AsyncIterator[profiler_pb2_grpc.ProfilerStub]:
    server, channel = await start(store, redis_url)
    yield profiler_pb2_grpc.ProfilerStub(channel)
    await channel.close()
    await server.stop()


def request(**overrides: object) -> profiler_pb2.ProfileRequest:
    fields: dict[str, object] = {
        "backend": "analytic",
        "model": "meta-llama/Llama-3.2-1B",
        "gpu_type": "H100-SXM",
        "tp": 1,
        "fraction": 0.5,
        "mix": FIXED,
        "seed": 7,
    } | overrides
    return profiler_pb2.ProfileRequest(**fields)  # type: ignore[arg-type]


async def test_profile_is_computed_then_served_from_redis(
    stub: profiler_pb2_grpc.ProfilerStub, store: Store, redis_url: str
) -> None:
    first = await stub.Profile(request(), timeout=30)
    assert not first.cached
    profile = first.profile
    assert profile.key.gpu_type == "H100-SXM" and profile.key.engine == "analytic-1"
    assert profile.key.mix == "fixed-512-128"
    assert profile.saturation_rate > 0
    rates = [p.rate for p in profile.points]
    assert rates == sorted(rates) and rates[-1] < profile.saturation_rate
    latencies = [p.mean_latency_s for p in profile.points]
    assert latencies == sorted(latencies)  # more load never makes calls faster
    second = await stub.Profile(request(), timeout=30)
    assert second.cached and second.profile == profile
    # a fresh service process (same Redis) still has it
    server, channel = await start(store, redis_url)
    got = await profiler_pb2_grpc.ProfilerStub(channel).GetProfile(
        profiler_pb2.GetProfileRequest(key=profile.key), timeout=5
    )
    assert got.profile == profile
    await channel.close()
    await server.stop()


async def test_refresh_recomputes_and_seed_is_deterministic(
    stub: profiler_pb2_grpc.ProfilerStub,
) -> None:
    first = await stub.Profile(request(), timeout=30)
    again = await stub.Profile(request(refresh=True), timeout=30)
    assert not again.cached and again.profile == first.profile


async def test_more_gpu_share_gives_more_throughput(stub: profiler_pb2_grpc.ProfilerStub) -> None:
    half = await stub.Profile(request(fraction=0.5), timeout=30)
    whole = await stub.Profile(request(fraction=1.0), timeout=30)
    assert whole.profile.saturation_rate > half.profile.saturation_rate


async def test_get_missing_profile_is_not_found(stub: profiler_pb2_grpc.ProfilerStub) -> None:
    key = pb.ProfileKey(
        model="x", gpu_type="H100-SXM", tp=1, fraction=1, engine="analytic-1", mix="m"
    )
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.GetProfile(profiler_pb2.GetProfileRequest(key=key), timeout=5)
    assert err.value.code() == grpc.StatusCode.NOT_FOUND


@pytest.mark.parametrize(
    ("overrides", "code", "details"),
    [
        (
            {"backend": "magic"},
            grpc.StatusCode.INVALID_ARGUMENT,
            "backend: must be one of analytic",
        ),
        ({"tp": 3}, grpc.StatusCode.INVALID_ARGUMENT, "tp: must be one of (1, 2, 4, 8), got 3"),
        ({"tp": 2, "fraction": 0.5}, grpc.StatusCode.INVALID_ARGUMENT, "a fraction < 1 needs tp 1"),
        (
            {"fraction": 1.5},
            grpc.StatusCode.INVALID_ARGUMENT,
            "fraction: must be in (0, 1], got 1.5",
        ),
        ({"gpu_type": "TPU"}, grpc.StatusCode.INVALID_ARGUMENT, "gpu type 'TPU'"),
        ({"model": "nope/model"}, grpc.StatusCode.NOT_FOUND, "nope/model"),
        (
            {"mix": profiler_pb2.RequestMixSpec()},
            grpc.StatusCode.INVALID_ARGUMENT,
            "mix: give input_len",
        ),
        (
            {"mix": profiler_pb2.RequestMixSpec(prompt_tokens=[1, 2], completion_tokens=[3])},
            grpc.StatusCode.INVALID_ARGUMENT,
            "must have equal lengths",
        ),
        # 70B weights (~140 GB) cannot fit a quarter of an 80 GB GPU
        (
            {"model": "meta-llama/Llama-3.1-70B", "fraction": 0.25},
            grpc.StatusCode.FAILED_PRECONDITION,
            "Llama-3.1-70B",
        ),
    ],
)
async def test_bad_requests(
    stub: profiler_pb2_grpc.ProfilerStub,
    overrides: dict[str, object],
    code: grpc.StatusCode,
    details: str,
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.Profile(request(**overrides), timeout=30)
    assert err.value.code() == code
    assert details in (err.value.details() or "")
