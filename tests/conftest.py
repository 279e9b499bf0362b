"""Shared fixtures: one real Redis server process per test session, one key namespace per test,
and the engine venv's ``vllm`` for the real-engine tests."""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from services.core.errors import NotFoundError
from services.runtime.engines import vllm_executable
from services.runtime.redis_server import RedisServer
from services.runtime.store import Store


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    server = RedisServer().start()
    yield server
    server.stop()


@pytest.fixture
def redis_url(redis_server: RedisServer) -> str:
    return redis_server.url


@pytest.fixture
def namespace() -> str:
    """A fresh key namespace, so tests sharing the server never see each other's keys."""
    return f"test-{uuid.uuid4().hex[:12]}"


@pytest.fixture
async def store(redis_url: str, namespace: str) -> AsyncIterator[Store]:
    s = Store.connect(redis_url, timeout_s=2.0, namespace=namespace)
    yield s
    await s.close()


@pytest.fixture(scope="session")
def vllm() -> Path:
    """The engine venv's ``vllm``: skipped without one, except in CI, where it must be there."""
    try:
        return vllm_executable()
    except NotFoundError as exc:
        if os.environ.get("CI"):
            pytest.fail(f"CI must run the engine tests: {exc}")
        pytest.skip(f"no engine venv ({exc})")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """`gpu` tests are opt-in: they need real NVIDIA hardware (SCEPSY_GPU_TESTS=1 to run)."""
    import os

    if os.environ.get("SCEPSY_GPU_TESTS") == "1":
        return
    skip = pytest.mark.skip(reason="needs a real GPU; set SCEPSY_GPU_TESTS=1 on a GPU host")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
