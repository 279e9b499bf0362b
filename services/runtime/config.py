"""One validated configuration object per service, built once at start.

A service's config is a frozen dataclass deriving from ``ServiceConfig``. Every field can be set by
a flag (``--redis-url``) or an environment variable (``SCEPSY_REDIS_URL``); flags win over the
environment, which wins over the default; a field in ``required`` has no default (a service
process's ``redis_url``: the default Redis may be somebody else's). Per-field checks and the
class's ``validate`` (cross-field rules) raise ``ConfigError`` naming the field, where it came from
and the value.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import types
import typing
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Self

from services.core.errors import ConfigError
from services.runtime import redis_url

Check = Callable[[Any], str | None]


def option(default: Any, help: str, check: Check | None = None) -> Any:
    """A config field with its help text and an optional check returning an error or None."""
    return field(default=default, metadata={"help": help, "check": check})


def in_range(lo: float, hi: float) -> Check:
    return lambda v: None if lo <= v <= hi else f"must be in {lo}..{hi}"


def positive(v: float) -> str | None:
    return None if v > 0 else "must be > 0"


def one_of(*choices: str) -> Check:
    return lambda v: None if v in choices else f"must be one of {', '.join(choices)}"


@dataclass(frozen=True)
class ServiceConfig:
    """Fields every service has."""

    host: str = option("127.0.0.1", "address the gRPC server binds")
    port: int = option(0, "gRPC port (0 picks a free one)", in_range(0, 65535))
    metrics_port: int = option(
        0, "port of GET /metrics, Prometheus text, on host (0 picks a free one)", in_range(0, 65535)
    )
    redis_url: str = option("redis://127.0.0.1:6379/0", "Redis URL for shared state")
    redis_password_file: str = option(
        "",
        "file holding the Redis password (used when the URL carries none; keeps it off the "
        "command line)",
    )
    tls_cert: str = option("", "TLS certificate file (PEM) of the gRPC server; with tls_key")
    tls_key: str = option("", "TLS private key file (PEM) of the gRPC server; with tls_cert")
    tls_ca: str = option(
        "",
        "CA file (PEM): clients verify servers with it; a server given it requires client "
        "certificates signed by it (mutual TLS)",
    )
    namespace: str = option(
        "scepsy", "prefix of every Redis key (several deployments can share one Redis)"
    )
    redis_timeout_s: float = option(2.0, "deadline of every Redis call", positive)
    log_format: str = option("json", "log output", one_of("json", "console"))
    log_level: str = option("info", "log level", one_of("debug", "info", "warning", "error"))
    drain_s: float = option(
        0.5, "time health reports NOT_SERVING before the server stops", in_range(0, 60)
    )
    grace_s: float = option(5.0, "time in-flight RPCs get to finish at shutdown", in_range(0, 600))
    service_ttl_s: float = option(
        10.0,
        "the service's record in Redis (address, PID) expires this long after its last refresh; "
        "it is refreshed every third of it",
        in_range(0.3, 3600),
    )

    def validate(self) -> None:
        """Cross-field rules; subclasses extend and call super()."""
        redis_url.checked(self.redis_url)
        if bool(self.tls_cert) != bool(self.tls_key):
            raise ConfigError("tls_cert, tls_key: give both or neither")
        if self.tls_ca and not self.tls_cert:
            raise ConfigError("tls_ca: a server requiring client certificates needs tls_cert")
        for name in ("tls_cert", "tls_key", "tls_ca", "redis_password_file"):
            path = getattr(self, name)
            if path and not os.path.isfile(path):
                raise ConfigError(f"{name}: no such file, got {path!r}")

    def redis_password(self) -> str | None:
        """The password of ``redis_password_file`` (None without one); ``ConfigError`` when the
        file cannot be read or is readable by others."""
        return read_password_file(self.redis_password_file)

    @classmethod
    def load(
        cls,
        argv: Sequence[str] | None = None,
        environ: Mapping[str, str] | None = None,
        prog: str | None = None,
        required: Sequence[str] = (),
    ) -> Self:
        """Build from flags and environment; raise ConfigError on the first bad field, or on a
        field of ``required`` given by neither."""
        environ = os.environ if environ is None else environ
        hints = typing.get_type_hints(cls)
        parser = argparse.ArgumentParser(prog=prog, description=cls.__doc__)
        for f in dataclasses.fields(cls):
            flag = "--" + f.name.replace("_", "-")
            given = (
                f"required: {flag} or env {env_name(f.name)}"
                if f.name in required
                else f"env {env_name(f.name)}; default {f.default!r}"
            )
            hint = f"{f.metadata.get('help', '')} ({given})"
            parser.add_argument(flag, dest=f.name, default=None, help=hint)
        args = parser.parse_args(argv)
        values: dict[str, Any] = {}
        for f in dataclasses.fields(cls):
            raw, origin = getattr(args, f.name), "--" + f.name.replace("_", "-")
            if raw is None and env_name(f.name) in environ:
                raw, origin = environ[env_name(f.name)], env_name(f.name)
            if raw is None and f.name in required:
                raise ConfigError(f"{f.name}: not given: pass {origin} or set {env_name(f.name)}")
            if raw is None:
                values[f.name] = f.default
                continue
            values[f.name] = _coerce(raw, hints[f.name], f.name, origin)
            check: Check | None = f.metadata.get("check")
            problem = check(values[f.name]) if check and values[f.name] is not None else None
            if problem:
                raise ConfigError(f"{f.name} ({origin}): {problem}, got {raw!r}")
        config = cls(**values)
        for f in dataclasses.fields(cls):  # defaults are checked too: a subclass may change them
            check = f.metadata.get("check")
            value = getattr(config, f.name)
            if check and value is not None and (problem := check(value)):
                raise ConfigError(f"{f.name}: {problem}, got {value!r}")
        config.validate()
        return config


def read_password_file(path: str) -> str | None:
    """The first line of the password file ``path`` (None when ``path`` is empty)."""
    if not path:
        return None
    try:
        if os.stat(path).st_mode & 0o077:
            raise ConfigError(f"redis_password_file: {path} is readable by others; chmod 600 it")
        with open(path) as f:
            password = f.readline().strip()
    except OSError as exc:
        raise ConfigError(f"redis_password_file: cannot read {path!r}: {exc.strerror}") from None
    if not password:
        raise ConfigError(f"redis_password_file: {path!r} is empty")
    return password


def env_name(field_name: str) -> str:
    return "SCEPSY_" + field_name.upper()


def _coerce(raw: str, kind: Any, name: str, origin: str) -> Any:
    optional = typing.get_origin(kind) in (typing.Union, types.UnionType) and type(None) in (
        typing.get_args(kind)
    )
    if optional:
        if raw == "":
            return None
        kind = next(a for a in typing.get_args(kind) if a is not type(None))
    try:
        if kind is bool:
            if raw.lower() in ("1", "true", "yes", "on"):
                return True
            if raw.lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError(raw)
        return kind(raw)
    except (TypeError, ValueError):
        raise ConfigError(
            f"{name} ({origin}): must be {getattr(kind, '__name__', kind)}, got {raw!r}"
        ) from None
