"""The router's configuration: the routing policy by its name or alias; errors name the field."""

from __future__ import annotations

import pytest

from services.core.errors import ConfigError
from services.router.config import RouterConfig


@pytest.mark.parametrize(
    ("argv", "env", "policy"),
    [
        ([], {}, "least-outstanding"),  # the default
        (["--policy", "power-of-two"], {}, "power-of-two"),
        (["--policy", "capacity_weighted"], {}, "capacity_weighted"),  # alias, kept as given
        ([], {"SCEPSY_POLICY": "affinity"}, "affinity"),
        ([], {"SCEPSY_POLICY": "least_outstanding"}, "least_outstanding"),
    ],
)
def test_policy_by_name_or_alias(argv: list[str], env: dict[str, str], policy: str) -> None:
    assert RouterConfig.load(argv, environ=env).policy == policy


@pytest.mark.parametrize(
    ("argv", "env", "origin"),
    [
        (["--policy", "round-robin"], {}, "--policy"),
        ([], {"SCEPSY_POLICY": "Least-Outstanding"}, "SCEPSY_POLICY"),
    ],
)
def test_an_unknown_policy_names_the_field_and_the_choices(
    argv: list[str], env: dict[str, str], origin: str
) -> None:
    with pytest.raises(ConfigError) as err:
        RouterConfig.load(argv, environ=env)
    assert str(err.value).startswith(
        f"policy ({origin}): must be one of "
        "affinity, capacity-weighted, least-outstanding, power-of-two, got "
    )


def test_api_keys_are_refused_on_the_command_line() -> None:
    for argv in (["--api-keys", "k1"], ["--api-keys=k1"]):
        with pytest.raises(ConfigError, match="api_keys: not on the command line") as caught:
            RouterConfig.load([*argv, "--redis-url", "redis://127.0.0.1:1/0"], environ={})
        assert "k1" not in str(caught.value)
    config = RouterConfig.load(["--redis-url", "redis://127.0.0.1:1/0"], {"SCEPSY_API_KEYS": "k1"})
    assert config.keys() == frozenset({"k1"})
