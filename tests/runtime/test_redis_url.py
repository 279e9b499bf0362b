"""Redis URLs never show their password: the pure ``redact``/``checked`` table, and a real service
process (its logs and its errors) against a closed port, a Redis that requires a password, and a URL
of the wrong scheme."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from services.core.errors import ConfigError
from services.runtime.redis_server import RedisServer, free_port
from services.runtime.redis_url import checked, redact

REPO = Path(__file__).resolve().parents[2]
SECRET = "s3cret-Pw"


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        # password -> ***; user, host, port, db kept
        ("redis://:s3cret@127.0.0.1:6379/0", "redis://:***@127.0.0.1:6379/0"),
        ("redis://user:s3cret@host/0", "redis://user:***@host/0"),
        ("rediss://user:p@ss@host:6380/2", "rediss://user:***@host:6380/2"),  # last @ splits
        ("unix://:s3cret@/tmp/redis.sock?db=1", "unix://:***@/tmp/redis.sock?db=1"),
        ("redis://host/0?password=s3cret&db=1", "redis://host/0?password=***&db=1"),
        # nothing to hide
        ("redis://user@host:6379/0", "redis://user@host:6379/0"),
        ("redis://127.0.0.1:6379/0", "redis://127.0.0.1:6379/0"),
        # not parseable: nothing of it is shown
        ("redis://:s3cret@[::1", "***"),
    ],
)
def test_redact(url: str, shown: str) -> None:
    assert redact(url) == shown


def test_checked_names_the_field_and_hides_the_password() -> None:
    assert checked("redis://:s3cret@h/0") == "redis://:s3cret@h/0"
    with pytest.raises(ConfigError) as info:
        checked("http://user:s3cret@x")
    assert str(info.value) == (
        "redis_url: must start with redis://, rediss://, unix://, redis+sentinel:// or "
        "rediss+sentinel://, got 'http://user:***@x'"
    )


@pytest.fixture(scope="module")
def password_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    server = RedisServer(workdir=tmp_path_factory.mktemp("redis"), password=SECRET).start()
    yield server
    server.stop()


def run_placer(url: str | None, seconds: float, until: str = "") -> tuple[int, str]:
    """``python -m services.placer --redis-url url`` (no flag when None) for ``seconds`` (or until
    it exits, or wrote ``until``: on a loaded machine the start alone can take seconds), then
    SIGINT; its exit code and everything it wrote."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SCEPSY_")}
    out_file = tempfile.TemporaryFile("w+")  # noqa: SIM115 - closed below, read while it runs
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "services.placer",
            "--service-ttl-s",
            "0.3",
            *(["--redis-url", url] if url else []),
        ],
        cwd=REPO,
        env=env,
        stdout=out_file,
        stderr=subprocess.STDOUT,
        text=True,
    )
    deadline = time.monotonic() + (seconds if not until else 30.0)
    while process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
        if until:
            out_file.seek(0)
            if until in out_file.read():
                time.sleep(seconds)
                break
    if process.poll() is None:
        process.send_signal(signal.SIGINT)
    process.wait(timeout=20)
    out_file.seek(0)
    out = out_file.read()
    out_file.close()
    return process.returncode, out


def test_service_logs_hide_the_password_of_an_unreachable_redis() -> None:
    url = f"redis://:{SECRET}@127.0.0.1:{free_port()}/0"
    _, out = run_placer(url, 0.5, until="registration_failed")
    assert "registration_failed" in out
    assert SECRET not in out
    assert f"redis://:***@127.0.0.1:{url.rsplit(':', 1)[1]}" in out


def test_service_logs_hide_a_wrong_password(password_redis: RedisServer) -> None:
    url = password_redis.url.replace(SECRET, "wrong-Pw")
    _, out = run_placer(url, 0.5, until="registration_failed")
    assert "registration_failed" in out
    assert "wrong-Pw" not in out and SECRET not in out
    assert f"redis://:***@127.0.0.1:{password_redis.port}/0" in out


def test_service_with_the_right_password_logs_no_password(password_redis: RedisServer) -> None:
    _, out = run_placer(password_redis.url, 1.0, until="server_started")
    assert "server_started" in out and "registration_failed" not in out
    assert SECRET not in out


def test_service_with_a_bad_scheme_exits_2_naming_the_field() -> None:
    code, out = run_placer(f"http://user:{SECRET}@x", 10.0)
    assert code == 2
    assert out.strip() == (
        "error: redis_url: must start with redis://, rediss://, unix://, redis+sentinel:// or "
        "rediss+sentinel://, got 'http://user:***@x'"
    )


def test_service_without_a_redis_url_exits_2_instead_of_using_a_default() -> None:
    # it used to serve against redis://127.0.0.1:6379/0, which may be somebody else's Redis
    code, out = run_placer(None, 10.0)
    assert code == 2
    assert out.strip() == ("error: redis_url: not given: pass --redis-url or set SCEPSY_REDIS_URL")
