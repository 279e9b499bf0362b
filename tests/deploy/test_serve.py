"""``scepsy serve SERVICE`` is ``python -m services.SERVICE`` (the images' entry point), and
``scepsy health`` is the compose health check: a real service process through the installed
``scepsy`` command on loopback with a real Redis; flag handling in-process against each
service module's own ``main``."""

from __future__ import annotations

import asyncio
import importlib
import os
import signal
import subprocess
import time

import pytest

from services.cli.main import main
from services.cli.suite import health
from services.runtime.redis_server import free_port
from tests.deploy.deployfiles import REPO, SCEPSY

SERVICES = ("agent", "profiler", "planner", "placer", "router")


@pytest.fixture(autouse=True)
def no_scepsy_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in os.environ:
        if name.startswith("SCEPSY_"):
            monkeypatch.delenv(name)


def outputs(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[object, str, str]:
    """Exit status (returned or raised) and output of main(argv) in this process."""
    try:
        code: object = main(argv) if argv[0] in ("serve", "health") else _module_main(argv)
    except SystemExit as exc:
        code = exc.code
    out, err = capsys.readouterr()
    return code, out, err


def _module_main(argv: list[str]) -> int:
    module = importlib.import_module(f"services.{argv[0]}.__main__")
    code: int = module.main(argv[1:])
    return code


@pytest.mark.parametrize("service", SERVICES)
def test_help_is_the_services_own(service: str, capsys: pytest.CaptureFixture[str]) -> None:
    served = outputs(["serve", service, "--help"], capsys)
    module = outputs([service, "--help"], capsys)
    assert served == module
    assert served[0] == 0 and "--redis-url" in str(served[1])


@pytest.mark.parametrize(
    ("flags", "env", "error"),
    [
        (["--port", "x"], {"SCEPSY_REDIS_URL": "redis://h:1/0"}, "port (--port): must be int"),
        ([], {}, "redis_url: not given"),
        ([], {"SCEPSY_REDIS_URL": "http://x"}, "redis_url: must start with redis://"),
    ],
)
def test_bad_settings_exit_2_like_the_module(
    flags: list[str],
    env: dict[str, str],
    error: str,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    served = outputs(["serve", "placer", *flags], capsys)
    module = outputs(["placer", *flags], capsys)
    assert served == module
    assert served[0] == 2 and str(served[2]).startswith(f"error: {error}")


def test_an_unknown_service_is_refused(capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = outputs(["serve", "scheduler"], capsys)
    assert code == 2
    assert "invalid choice: 'scheduler'" in err


async def test_served_process_is_healthy_then_stops_on_sigterm(
    redis_url: str, namespace: str
) -> None:
    port = free_port()
    env = {"SCEPSY_REDIS_URL": redis_url, "SCEPSY_NAMESPACE": namespace, "SCEPSY_PORT": str(port)}
    process = await asyncio.create_subprocess_exec(
        str(SCEPSY),
        "serve",
        "profiler",
        env={**os.environ, **env},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        cwd=REPO,
    )
    try:
        deadline = time.monotonic() + 60
        while await health(f"127.0.0.1:{port}", 1.0) != "SERVING":
            assert process.returncode is None and time.monotonic() < deadline
            await asyncio.sleep(0.1)
        code, out = await scepsy("health", env=env)  # its own port, from SCEPSY_PORT
        assert (code, out) == (0, "")
    finally:
        process.send_signal(signal.SIGTERM)
        await asyncio.wait_for(process.wait(), 30)
    assert process.returncode == 0
    code, out = await scepsy("health", "--timeout", "0.5", env=env)
    assert (code, out.strip()) == (1, f"127.0.0.1:{port}: UNAVAILABLE")


async def scepsy(*argv: str, env: dict[str, str]) -> tuple[int | None, str]:
    done = await asyncio.create_subprocess_exec(
        str(SCEPSY), *argv, env={**os.environ, **env}, stdout=subprocess.PIPE
    )
    out, _ = await asyncio.wait_for(done.communicate(), 60)
    return done.returncode, out.decode()


@pytest.mark.parametrize(
    ("env", "argv", "error"),
    [
        ({}, [], "error: address: not given and SCEPSY_PORT names no fixed port, got ''"),
        ({"SCEPSY_PORT": "0"}, [], "got '0'"),
        ({}, ["127.0.0.1:1", "--timeout", "0"], "error: --timeout: must be > 0, got 0.0"),
    ],
)
def test_health_refuses_what_it_cannot_check(
    env: dict[str, str],
    argv: list[str],
    error: str,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    code = main(["health", *argv])
    err = capsys.readouterr().err
    assert code == 2
    assert error in err
