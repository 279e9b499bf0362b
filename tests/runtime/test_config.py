"""Service configuration: flags over environment over defaults; errors name the field."""

from __future__ import annotations

import subprocess
import sys

import pytest

from services.agent.config import AgentConfig
from services.core.errors import ConfigError
from services.runtime.config import ServiceConfig


def test_defaults() -> None:
    config = ServiceConfig.load([], environ={})
    assert config.port == 0 and config.redis_url == "redis://127.0.0.1:6379/0"


def test_flag_beats_environment_beats_default() -> None:
    env = {"SCEPSY_PORT": "7000", "SCEPSY_LOG_LEVEL": "debug"}
    config = ServiceConfig.load(["--port", "7001"], environ=env)
    assert config.port == 7001  # flag
    assert config.log_level == "debug"  # environment
    assert config.grace_s == 5.0  # default


@pytest.mark.parametrize(
    ("argv", "env", "message"),
    [
        (["--port", "70000"], {}, "port (--port): must be in 0..65535, got '70000'"),
        ([], {"SCEPSY_PORT": "http"}, "port (SCEPSY_PORT): must be int, got 'http'"),
        (["--log-format", "xml"], {}, "log_format (--log-format): must be one of json, console"),
        (["--redis-timeout-s", "0"], {}, "redis_timeout_s (--redis-timeout-s): must be > 0"),
        (["--redis-url", "localhost:6379"], {}, "redis_url: must start with redis://"),
    ],
)
def test_errors_name_the_field(argv: list[str], env: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError) as err:
        ServiceConfig.load(argv, environ=env)
    assert message in str(err.value)


def test_agent_cross_field_rule() -> None:
    with pytest.raises(
        ConfigError, match=r"node_ttl_s: must be at least twice heartbeat_s \(2.0\), got 3.0"
    ):
        AgentConfig.load(["--node-ttl-s", "3"], environ={})
    config = AgentConfig.load(["--node-ttl-s", "4", "--node-name", "n7"], environ={})
    assert config.resolved_node_name == "n7"


def test_agent_bool_and_float_parsing() -> None:
    config = AgentConfig.load([], environ={"SCEPSY_HEARTBEAT_S": "0.5", "SCEPSY_NODE_TTL_S": "1.5"})
    assert config.heartbeat_s == 0.5 and config.node_ttl_s == 1.5


@pytest.mark.parametrize("service", ["agent", "profiler", "planner", "placer"])
def test_service_help_says_the_redis_url_is_required(service: str) -> None:
    done = subprocess.run(
        [sys.executable, "-m", f"services.{service}", "--help"],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    text = " ".join(done.stdout.split())  # argparse wraps lines at the terminal's width
    assert "Redis URL for shared state (required: --redis-url or env SCEPSY_REDIS_URL)" in text
    assert "redis://127.0.0.1:6379/0" not in text


def test_help_of_an_in_process_config_shows_the_default(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        ServiceConfig.load(["--help"], environ={})
    text = " ".join(capsys.readouterr().out.split())
    assert "(env SCEPSY_REDIS_URL; default 'redis://127.0.0.1:6379/0')" in text
