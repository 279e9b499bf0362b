"""A Redis behind Sentinel (``redis+sentinel://``): the store finds the master through a real
sentinel process, and bad sentinel URLs are clear errors that never show a password."""

from __future__ import annotations

import asyncio
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from services.core.errors import ConfigError
from services.core.routing import Endpoint
from services.runtime.redis_server import RedisServer, free_port, server_binary
from services.runtime.redis_url import checked, redact
from services.runtime.store import Store


@pytest.fixture
def sentinel(tmp_path: Path) -> Iterator[tuple[RedisServer, int]]:
    master = RedisServer(workdir=tmp_path / "master", password="s3cret-pw")
    (tmp_path / "master").mkdir()
    master.start()
    port = free_port()
    conf = tmp_path / "sentinel.conf"
    conf.write_text(
        f"port {port}\nbind 127.0.0.1\ndir {tmp_path}\n"
        f"sentinel monitor main 127.0.0.1 {master.port} 1\n"
        "sentinel auth-pass main s3cret-pw\n"
    )
    process = subprocess.Popen(
        [server_binary(), str(conf), "--sentinel"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        cwd=tmp_path,
    )
    try:
        yield master, port
    finally:
        process.terminate()
        process.wait(timeout=10)
        master.stop()


async def test_store_finds_the_master_through_the_sentinel(
    sentinel: tuple[RedisServer, int],
) -> None:
    master, port = sentinel
    store = Store.connect(f"redis+sentinel://:s3cret-pw@127.0.0.1:{port}/main/0", namespace="t")
    try:
        deadline = time.monotonic() + 10  # the sentinel learns its master within a moment
        while True:
            try:
                assert await store.ping()
                break
            except Exception:
                if time.monotonic() > deadline:
                    raise
                await asyncio.sleep(0.2)
        await store.put_endpoint(Endpoint("gen", "r0", "http://127.0.0.1:9", 1.0))
        assert [e.replica for e in await store.list_endpoints()] == ["r0"]
    finally:
        await store.close()
    direct = Store.connect(master.url, namespace="t")  # the same data, on the master itself
    try:
        assert [e.url for e in await direct.list_endpoints()] == ["http://127.0.0.1:9"]
    finally:
        await direct.close()


@pytest.mark.parametrize(
    ("url", "problem"),
    [
        ("redis+sentinel://:pw@127.0.0.1:26379", "ends with /SERVICE[/DB]"),
        ("redis+sentinel://:pw@127.0.0.1:26379/main/x", "ends with /SERVICE[/DB]"),
        ("redis+sentinel://:pw@127.0.0.1/main", "is not host:port"),
    ],
)
def test_bad_sentinel_urls_name_the_field_and_hide_the_password(url: str, problem: str) -> None:
    with pytest.raises(ConfigError) as caught:
        Store.connect(url)
    message = str(caught.value)
    assert message.startswith("redis_url: ") and problem in message
    assert "pw" not in message.replace("password", "")
    assert checked("rediss+sentinel://h:1,h2:2/main") == "rediss+sentinel://h:1,h2:2/main"
    shown = redact("redis+sentinel://u:pw@a:1,b:2/main?sentinel_password=spw")
    assert "pw" not in shown.replace("sentinel_password", "") and "a:1,b:2/main" in shown
