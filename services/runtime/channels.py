"""gRPC channels of every client, with TLS the same way everywhere.

TLS is set by three files, the ``ServiceConfig`` fields ``tls_cert``, ``tls_key`` and ``tls_ca``
(flags ``--tls-cert``..., environment ``SCEPSY_TLS_CERT``, ``SCEPSY_TLS_KEY``, ``SCEPSY_TLS_CA``):

* a **server** given ``tls_cert`` and ``tls_key`` listens with TLS only; given ``tls_ca`` too,
  it requires client certificates signed by that CA (mutual TLS);
* a **client** uses TLS when ``tls_ca`` or ``tls_cert`` is set: it verifies the server with
  ``tls_ca`` (else the system's roots) and presents ``tls_cert``/``tls_key`` as its own
  certificate when given (for servers that require one).

A service process's clients (the planner's Profiler and Placer clients, say) use the files of
its own config (``use``, called by ``run_service``); any other process (the CLI) reads the
environment. ``channel``/``aio_channel`` open a channel with those settings.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import grpc

from services.core.errors import ConfigError
from services.runtime.config import ServiceConfig


@dataclass(frozen=True)
class Tls:
    """The three TLS files (empty: not given)."""

    cert: str = ""
    key: str = ""
    ca: str = ""

    @classmethod
    def of(cls, config: ServiceConfig) -> Tls:
        return cls(config.tls_cert, config.tls_key, config.tls_ca)

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Tls:
        env = os.environ if environ is None else environ
        return cls(
            env.get("SCEPSY_TLS_CERT", ""),
            env.get("SCEPSY_TLS_KEY", ""),
            env.get("SCEPSY_TLS_CA", ""),
        )

    @property
    def client_enabled(self) -> bool:
        return bool(self.ca or self.cert)

    def server_credentials(self) -> grpc.ServerCredentials:
        if not (self.cert and self.key):
            raise ConfigError("tls_cert, tls_key: a TLS server needs both")
        ca = _read("tls_ca", self.ca) if self.ca else None
        return grpc.ssl_server_credentials(
            [(_read("tls_key", self.key), _read("tls_cert", self.cert))],
            root_certificates=ca,
            require_client_auth=ca is not None,
        )

    def channel_credentials(self) -> grpc.ChannelCredentials:
        if bool(self.cert) != bool(self.key):
            raise ConfigError("tls_cert, tls_key: a client certificate needs both")
        return grpc.ssl_channel_credentials(
            root_certificates=_read("tls_ca", self.ca) if self.ca else None,
            private_key=_read("tls_key", self.key) if self.key else None,
            certificate_chain=_read("tls_cert", self.cert) if self.cert else None,
        )


_default: Tls | None = None


def use(tls: Tls | None) -> None:
    """Make ``tls`` the settings of this process's client channels (a service's own files;
    None: the environment's)."""
    global _default
    _default = tls


def current() -> Tls:
    """This process's client TLS settings: those given to ``use``, else the environment's."""
    return _default if _default is not None else Tls.from_env()


def aio_channel(target: str, tls: Tls | None = None) -> grpc.aio.Channel:
    """An asyncio channel to ``target`` (TLS per ``tls``, default ``current()``)."""
    tls = tls if tls is not None else current()
    if tls.client_enabled:
        return grpc.aio.secure_channel(target, tls.channel_credentials())
    return grpc.aio.insecure_channel(target)


def channel(target: str, tls: Tls | None = None) -> grpc.Channel:
    """A blocking channel to ``target`` (TLS per ``tls``, default ``current()``)."""
    tls = tls if tls is not None else current()
    if tls.client_enabled:
        return grpc.secure_channel(target, tls.channel_credentials())
    return grpc.insecure_channel(target)


def _read(field: str, path: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise ConfigError(f"{field}: cannot read {path!r}: {exc.strerror}") from None
