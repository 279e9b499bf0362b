"""The router's configuration: front ends, dispatch limits, health checks, tracing, API keys.

API keys come from ``api_keys`` (comma-separated; environment ``SCEPSY_API_KEYS`` only, never a
flag, which ``ps`` would show) and/or ``api_keys_file`` (one key per line); neither is ever shown
in the config's repr or in logs.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Self

from services.core.errors import ConfigError
from services.core.routing import ALIASES, DEFAULT_POLICY, POLICIES
from services.runtime.config import ServiceConfig, in_range, option, positive


def _known_policy(name: str) -> str | None:
    # The underscore aliases are accepted but not offered: the error lists the registered names.
    if ALIASES.get(name, name) in POLICIES:
        return None
    return f"must be one of {', '.join(sorted(POLICIES))}"


def _secret(help: str) -> str:
    # Like ``option`` but hidden from repr, so that logging the config never prints a key.
    value: str = field(default="", repr=False, metadata={"help": help, "check": None})
    return value


@dataclass(frozen=True)
class RouterConfig(ServiceConfig):
    """Router: OpenAI-compatible HTTP and gRPC dispatch of workflow LLM calls, with tracing."""

    http_host: str = option("", "address the HTTP server binds (default: host)")
    http_port: int = option(8000, "HTTP port (0 picks a free one)", in_range(0, 65535))
    policy: str = option(
        DEFAULT_POLICY, f"routing policy: {', '.join(sorted(POLICIES))}", _known_policy
    )
    policy_seed: int = option(0, "seed of the power-of-two policy")
    affinity_load_factor: float = option(
        1.25, "affinity policy: max load of a replica relative to the mean", in_range(1.0, 100.0)
    )
    max_in_flight: int = option(
        64, "calls one replica serves at once; more wait in the queue", in_range(1, 100_000)
    )
    queue_size: int = option(
        256, "calls of one model that may wait for a free replica", in_range(0, 1_000_000)
    )
    queue_timeout_s: float = option(30.0, "longest wait in the queue before a 429", positive)
    retry_after_s: float = option(1.0, "retry hint sent with a 429 / RESOURCE_EXHAUSTED", positive)
    upstream_timeout_s: float = option(300.0, "deadline of every upstream call", positive)
    connect_timeout_s: float = option(2.0, "deadline of connecting to a replica", positive)
    stream_idle_timeout_s: float = option(
        60.0,
        "a streamed answer that sends nothing for this long is ended with an error (an engine "
        "that stopped generating but keeps the connection open)",
        positive,
    )
    metrics_auth: bool = option(
        False, "GET /metrics on the HTTP port needs an API key too (when keys are set)"
    )
    health_interval_s: float = option(1.0, "seconds between replica health checks", positive)
    health_timeout_s: float = option(1.0, "deadline of one health check", positive)
    eject_after: int = option(
        3, "consecutive failed health checks that eject a replica", in_range(1, 1000)
    )
    refresh_s: float = option(2.0, "seconds between re-reads of the replicas from Redis", positive)
    max_body_bytes: int = option(
        16 * 1024 * 1024, "largest request body accepted (413 beyond)", in_range(1024, 1 << 31)
    )
    trace: bool = option(True, "record every call in the Redis trace stream")
    trace_max_len: int = option(1_000_000, "trace stream cap (approximate)", in_range(1, 1 << 40))
    trace_batch: int = option(256, "trace records written per round trip", in_range(1, 100_000))
    trace_flush_s: float = option(
        1.0,
        "longest a trace record waits before a write (each write costs the router a Redis "
        "round trip: at low call rates about one per call, so not much shorter)",
        positive,
    )
    trace_buffer: int = option(
        100_000, "trace records held while Redis is slow; more are dropped", in_range(1, 1 << 30)
    )
    api_keys: str = _secret(
        "comma-separated bearer tokens; empty: no authentication. Environment only: the flag is "
        "refused, since `ps` shows command lines"
    )
    api_keys_file: str = option("", "file with one bearer token per line")

    @classmethod
    def load(
        cls,
        argv: Sequence[str] | None = None,
        environ: Mapping[str, str] | None = None,
        prog: str | None = None,
        required: Sequence[str] = (),
    ) -> Self:
        """As ``ServiceConfig.load``; API keys on the command line are refused."""
        given = sys.argv[1:] if argv is None else argv
        if any(a == "--api-keys" or a.startswith("--api-keys=") for a in given):
            raise ConfigError(
                "api_keys: not on the command line, where `ps` shows it: set SCEPSY_API_KEYS "
                "or use --api-keys-file"
            )
        return super().load(argv, environ, prog, required)

    def validate(self) -> None:
        super().validate()
        if not self.namespace:
            raise ConfigError("namespace: must not be empty")
        if self.connect_timeout_s > self.upstream_timeout_s:
            raise ConfigError(
                f"connect_timeout_s: must not exceed upstream_timeout_s "
                f"({self.upstream_timeout_s}), got {self.connect_timeout_s}"
            )
        if self.api_keys_file and not Path(self.api_keys_file).is_file():
            raise ConfigError(f"api_keys_file: no such file, got {self.api_keys_file!r}")

    @property
    def resolved_http_host(self) -> str:
        return self.http_host or self.host

    def keys(self) -> frozenset[str]:
        """The accepted bearer tokens (empty: authentication off)."""
        found = [k.strip() for k in self.api_keys.split(",")]
        if self.api_keys_file:
            found += [k.strip() for k in Path(self.api_keys_file).read_text().splitlines()]
        return frozenset(k for k in found if k and not k.startswith("#"))
