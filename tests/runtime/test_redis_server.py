"""The embedded Redis (``scepsy up``'s): state that survives a restart, and a lock on the door."""

from __future__ import annotations

import asyncio
import os
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from services.core.errors import ConfigError, UnavailableError
from services.core.routing import Endpoint
from services.runtime.config import ServiceConfig
from services.runtime.redis_server import USER, RedisServer, password_in
from services.runtime.store import Store


@pytest.fixture
def embedded(tmp_path: Path) -> Iterator[RedisServer]:
    server = RedisServer.embedded(tmp_path / "home").start()
    yield server
    server.stop()


def test_the_password_is_generated_once_and_kept_private(tmp_path: Path) -> None:
    first = password_in(tmp_path)
    assert len(first) >= 32
    assert stat.S_IMODE((tmp_path / "redis.password").stat().st_mode) == 0o600
    assert password_in(tmp_path) == first
    os.chmod(tmp_path / "redis.password", 0o644)
    with pytest.raises(ConfigError, match=r"redis_password_file: .* readable by others"):
        password_in(tmp_path)


def test_the_password_is_on_no_command_line(embedded: RedisServer) -> None:
    assert embedded.process is not None and embedded.password
    cmdline = Path(f"/proc/{embedded.process.pid}/cmdline").read_bytes()
    assert embedded.password.encode() not in cmdline
    config = embedded.workdir / "redis.conf"
    assert stat.S_IMODE(config.stat().st_mode) == 0o600
    assert embedded.password not in embedded.public_url


async def test_only_authenticated_clients_can_register_endpoints_or_plan(
    embedded: RedisServer,
) -> None:
    anonymous = Store.connect(f"redis://127.0.0.1:{embedded.port}/0", timeout_s=1.0)
    wrong = Store.connect(f"redis://{USER}:nope@127.0.0.1:{embedded.port}/0", timeout_s=1.0)
    try:
        for store in (anonymous, wrong):
            with pytest.raises(UnavailableError) as caught:
                await store.put_endpoint(Endpoint("m", "m-0", "http://elsewhere:1"))
            assert "nope" not in str(caught.value)
            with pytest.raises(UnavailableError):
                await store.list_endpoints()
    finally:
        await anonymous.close()
        await wrong.close()
    # the password file, as services get it, opens the door
    config = ServiceConfig(
        redis_url=embedded.public_url, redis_password_file=str(embedded.password_file)
    )
    config.validate()
    store = Store.connect(config.redis_url, 1.0, "t", config.redis_password())
    try:
        await store.put_endpoint(Endpoint("m", "m-0", "http://127.0.0.1:1"))
        assert [e.replica for e in await store.list_endpoints()] == ["m-0"]
    finally:
        await store.close()


@pytest.mark.parametrize("crash", [False, True])
async def test_endpoints_and_the_current_plan_survive_a_restart(
    embedded: RedisServer, crash: bool
) -> None:
    store = Store.connect(embedded.url, 1.0, "t")
    try:
        await store.put_endpoint(Endpoint("m", "m-0", "http://127.0.0.1:1", 2.0))
        await store._r.set(store.keys.current_plan, "plan-1")  # the pointer, as put_plan sets it
        if crash:
            await asyncio.sleep(1.5)  # the append-only file is synced every second
            embedded.kill()
            embedded.start()
        else:
            embedded.restart()
        assert await store.list_endpoints() == [Endpoint("m", "m-0", "http://127.0.0.1:1", 2.0)]
        assert await store.current_plan_id() == "plan-1"
        embedded.restart(keep_data=False)
        assert await store.list_endpoints() == []
    finally:
        await store.close()


def test_a_service_reads_the_password_from_its_file(embedded: RedisServer) -> None:
    """A service given the password file (as `scepsy up` starts them) connects; its command
    line, environment and log hold no password."""
    env = {
        **os.environ,
        "SCEPSY_REDIS_URL": embedded.public_url,
        "SCEPSY_REDIS_PASSWORD_FILE": str(embedded.password_file),
    }
    code = (
        "import asyncio, sys\n"
        "from services.runtime.config import ServiceConfig\n"
        "from services.runtime.store import Store\n"
        "c = ServiceConfig.load([])\n"
        "async def main():\n"
        "    s = Store.connect(c.redis_url, 1.0, 't', c.redis_password())\n"
        "    print(await s.ping()); await s.close()\n"
        "asyncio.run(main())\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code],
        check=False,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "True"
    assert embedded.password and embedded.password not in done.stdout + done.stderr
