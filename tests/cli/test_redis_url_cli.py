"""The CLI and Redis URLs, as a user runs it (real processes, a real Redis that requires a
password): the password is never printed, the URL is found by one rule (``--redis-url``, else
``SCEPSY_REDIS_URL``, else ``REDIS_URL``, else the suite's state file, else an error naming them),
and a URL of the wrong scheme is an ``error: redis_url: ...`` with exit code 2, not a traceback."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from services.runtime.redis_server import RedisServer, free_port

REPO = Path(__file__).resolve().parents[2]
CLUSTER = REPO / "deploy/examples/cluster-2xh100.yaml"
SPEC = REPO / "deploy/examples/spec-rag.yaml"
SECRET = "s3cret-Pw"
NO_REDIS = (
    "error: no Redis given and no cluster is up here: pass --redis-url, set SCEPSY_REDIS_URL "
    "or REDIS_URL, or run `scepsy up` first\n"
)


@pytest.fixture(scope="module")
def password_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    server = RedisServer(workdir=tmp_path_factory.mktemp("redis"), password=SECRET).start()
    yield server
    server.stop()


def scepsy(
    home: Path, *args: str, env: dict[str, str] | None = None, timeout_s: float = 120
) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if k != "REDIS_URL" and not k.startswith("SCEPSY_")}
    return subprocess.run(
        [sys.executable, "-m", "services.cli", *args],
        cwd=REPO,
        env=base | {"SCEPSY_HOME": str(home)} | (env or {}),
        capture_output=True,
        check=False,
        text=True,
        timeout=timeout_s,
    )


def test_nodes_and_status_json_hide_the_password(
    tmp_path: Path, password_redis: RedisServer
) -> None:
    shown = f"redis://:***@127.0.0.1:{password_redis.port}/0"
    nodes = scepsy(tmp_path, "nodes", "--json", "--redis-url", password_redis.url)
    assert nodes.returncode == 0, nodes.stderr
    assert SECRET not in nodes.stdout + nodes.stderr
    assert json.loads(nodes.stdout)["redis_url"] == shown
    status = scepsy(tmp_path, "status", "--json", "--redis-url", password_redis.url)
    assert status.returncode == 0, status.stderr
    assert SECRET not in status.stdout + status.stderr
    doc = json.loads(status.stdout)
    assert doc["redis"]["url"] == shown and doc["redis"]["reachable"]
    text = scepsy(tmp_path, "status", "--redis-url", password_redis.url)
    assert text.returncode == 0 and SECRET not in text.stdout and shown in text.stdout


def test_errors_hide_the_password(tmp_path: Path, password_redis: RedisServer) -> None:
    closed = f"redis://:{SECRET}@127.0.0.1:{free_port()}/0"
    for args in (
        ["nodes"],
        ["endpoints", "list"],
        ["plan", "--spec", str(SPEC), "--offline", "--store"],
    ):
        done = scepsy(tmp_path, *args, "--redis-url", closed)
        assert done.returncode == 2, (args, done.stderr)
        assert done.stderr.startswith("error: redis at redis://:***@127.0.0.1:"), done.stderr
        assert SECRET not in done.stdout + done.stderr
    wrong = password_redis.url.replace(SECRET, "wrong-Pw")
    done = scepsy(tmp_path, "nodes", "--redis-url", wrong)
    assert done.returncode == 2 and "wrong-Pw" not in done.stderr
    assert done.stderr.startswith(f"error: redis at redis://:***@127.0.0.1:{password_redis.port}")
    status = scepsy(tmp_path, "status", "--json", "--redis-url", closed)
    assert status.returncode == 0 and SECRET not in status.stdout + status.stderr
    assert json.loads(status.stdout)["redis"]["error"].startswith("redis at redis://:***@")


@pytest.mark.parametrize(
    "args",
    [
        ["nodes"],
        ["status"],
        ["status", "--json"],
        ["endpoints", "list"],
        ["plan", "--spec", str(SPEC), "--offline", "--store"],
        ["router"],
    ],
)
def test_a_bad_scheme_is_a_named_error_not_a_traceback(tmp_path: Path, args: list[str]) -> None:
    expected = (
        "error: redis_url: must start with redis://, rediss://, unix://, redis+sentinel:// or "
        "rediss+sentinel://, got 'http://u:***@x'\n"
    )
    flag = scepsy(tmp_path, *args, "--redis-url", f"http://u:{SECRET}@x")
    assert (flag.returncode, flag.stdout, flag.stderr) == (2, "", expected)
    env = scepsy(tmp_path, *args, env={"SCEPSY_REDIS_URL": f"http://u:{SECRET}@x"})
    assert (env.returncode, env.stdout, env.stderr) == (2, "", expected)


def test_up_with_a_bad_scheme_starts_nothing(tmp_path: Path) -> None:
    done = scepsy(tmp_path, "up", "--redis-url", f"http://u:{SECRET}@x")
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert done.stderr.startswith("error: redis_url: must start with") and SECRET not in done.stderr
    assert not (tmp_path / "state.json").exists()


def test_the_url_is_found_by_one_rule(tmp_path: Path, redis_url: str) -> None:
    closed = f"redis://127.0.0.1:{free_port()}/0"
    # SCEPSY_REDIS_URL is read (it was ignored), and wins over REDIS_URL
    done = scepsy(
        tmp_path, "nodes", "--json", env={"SCEPSY_REDIS_URL": redis_url, "REDIS_URL": closed}
    )
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["redis_url"] == redis_url
    # the flag wins over both
    done = scepsy(
        tmp_path, "nodes", "--json", "--redis-url", redis_url, env={"SCEPSY_REDIS_URL": closed}
    )
    assert done.returncode == 0 and json.loads(done.stdout)["redis_url"] == redis_url
    # nothing given and nothing up: an error naming every way to give one, no default Redis
    done = scepsy(tmp_path, "nodes")
    assert done.returncode == 2
    assert done.stderr == NO_REDIS


def test_router_without_a_redis_is_an_error_not_a_default(tmp_path: Path) -> None:
    # it used to serve against redis://127.0.0.1:6379/0, which may be somebody else's Redis
    done = scepsy(tmp_path, "router", "--http-port", "0", timeout_s=20)
    assert (done.returncode, done.stdout, done.stderr) == (2, "", NO_REDIS)


@pytest.mark.slow
def test_up_hides_the_password_and_keeps_it_in_a_private_state_file(
    tmp_path: Path, password_redis: RedisServer
) -> None:
    shown = f"redis://:***@127.0.0.1:{password_redis.port}/0"
    try:
        up = scepsy(
            tmp_path, "up", "--cluster", str(CLUSTER), env={"SCEPSY_REDIS_URL": password_redis.url}
        )
        assert up.returncode == 0, up.stderr
        assert SECRET not in up.stdout + up.stderr
        assert up.stdout.splitlines()[0].split() == ["redis", shown]
        state = tmp_path / "state.json"
        assert stat.S_IMODE(state.stat().st_mode) == 0o600
        assert json.loads(state.read_text())["redis"]["url"] == password_redis.url  # for `down`
        status = scepsy(tmp_path, "status", "--json")
        assert status.returncode == 0 and SECRET not in status.stdout
        doc = json.loads(status.stdout)
        assert doc["redis"]["url"] == shown and doc["redis"]["reachable"]
        assert all(s["healthy"] for s in doc["services"]), doc["services"]
        for log in tmp_path.glob("*.log"):
            assert SECRET not in log.read_text(), log
    finally:
        down = scepsy(tmp_path, "down")
    assert down.returncode == 0, down.stderr
