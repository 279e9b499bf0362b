"""The Redis store against a real server: profiles round-trip, events announce changes, and an
unreachable Redis fails fast with UnavailableError instead of hanging."""

from __future__ import annotations

import asyncio
import socket
import time

import pytest

from services.core.cluster.declared import parse_cluster
from services.core.errors import UnavailableError
from services.core.perf.profile import Profile, ProfileKey, ProfilePoint
from services.runtime.redis_server import free_port
from services.runtime.store import Store

KEY = ProfileKey("llama-3.1-8b", "H100-SXM", 2, 1.0, "analytic-1", "in512-out128")


def profile(saturation: float) -> Profile:
    points = tuple(
        ProfilePoint(
            rate=r, mean_latency=1 + r / 10, p50_latency=1, p99_latency=2, ttft=0.1, tpot=0.01
        )
        for r in (1.0, 2.0, 4.0)
    )
    return Profile(KEY, points, saturation)


async def test_profile_round_trip_and_replace(store: Store) -> None:
    assert await store.get_profile(KEY) is None
    await store.put_profile(profile(5.0))
    assert await store.get_profile(KEY) == profile(5.0)
    await store.put_profile(profile(6.0))
    got = await store.get_profile(KEY)
    assert got is not None and got.saturation_rate == 6.0
    other = ProfileKey("llama-3.1-8b", "H100-SXM", 4, 1.0, "analytic-1", "in512-out128")
    assert await store.get_profile(other) is None


async def test_a_fan_out_profile_reads_back_with_its_group(store: Store) -> None:
    measured = [(r, 10, 0) for r in (1.0, 2.0, 4.0)]
    await store.put_measured_profile(profile(5.0), measured, {"mode": "fanout", "fanout": 6})
    got = await store.get_profile(KEY)
    assert got is not None and got.group == 6.0  # the ALP adds bursts beyond 6 calls only
    await store.put_measured_profile(profile(5.0), measured, {"mode": "poisson", "fanout": 1})
    got = await store.get_profile(KEY)
    assert got is not None and got.group == 1.0


async def test_node_join_heartbeat_and_removal(store: Store) -> None:
    node = parse_cluster({"version": 1, "nodes": [{"name": "n", "gpu_type": "L40S", "gpus": 1}]})[0]
    assert await store.put_node(node, ttl_s=5) is True  # a join
    assert await store.put_node(node, ttl_s=5) is False  # a heartbeat
    assert [n.name for n in await store.list_nodes()] == ["n"]
    await store.remove_node("n")
    assert await store.list_nodes() == [] and await store.get_node("n") is None


async def test_refused_connection_is_unavailable() -> None:
    store = Store.connect(f"redis://127.0.0.1:{free_port()}/0", timeout_s=0.3)
    with pytest.raises(UnavailableError, match=r"redis at redis://127\.0\.0\.1"):
        await asyncio.wait_for(store.list_nodes(), timeout=5)
    await store.close()


async def test_silent_server_hits_the_deadline() -> None:
    # A peer that accepts connections but never answers: only the call deadline ends the wait.
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        store = Store.connect(f"redis://127.0.0.1:{silent.getsockname()[1]}/0", timeout_s=0.3)
        t0 = time.monotonic()
        with pytest.raises(UnavailableError):
            await asyncio.wait_for(store.get_profile(KEY), timeout=5)
        assert 0.25 < time.monotonic() - t0 < 3
        await store.close()
