"""TLS and mutual TLS on a gRPC server of the one ``Server``, and the clients' channels
(``services.runtime.channels``). Certificates are made by the openssl command for each run."""

from __future__ import annotations

import subprocess
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.cli.suite import health
from services.core.errors import ConfigError
from services.runtime import channels
from services.runtime.channels import Tls
from services.runtime.config import ServiceConfig
from services.runtime.server import Server


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


def _ca(d: Path, name: str) -> None:
    _openssl(
        "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
        "-keyout", f"{name}.key", "-out", f"{name}.pem", "-days", "1", "-subj", f"/CN={name}",
        cwd=d,
    )  # fmt: skip


def _signed(d: Path, name: str, ca: str) -> None:
    _openssl(
        "req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
        "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", f"/CN={name}", cwd=d,
    )  # fmt: skip
    (d / "san.ext").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    _openssl(
        "x509", "-req", "-in", f"{name}.csr", "-CA", f"{ca}.pem", "-CAkey", f"{ca}.key",
        "-CAcreateserial", "-out", f"{name}.pem", "-days", "1", "-extfile", "san.ext", cwd=d,
    )  # fmt: skip


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("certs")
    _ca(d, "ca")
    _ca(d, "other-ca")
    _signed(d, "server", "ca")
    _signed(d, "client", "ca")
    _signed(d, "stranger", "other-ca")
    return d


@pytest.fixture
def restore_channels() -> Iterator[None]:
    yield
    channels.use(None)


async def _serve(config: ServiceConfig) -> AsyncIterator[Server]:
    server = Server(config, [])
    await server.start()
    try:
        yield server
    finally:
        await server.stop()


def _config(certs: Path, mutual: bool) -> ServiceConfig:
    config = ServiceConfig(
        port=0,
        drain_s=0.0,
        grace_s=0.5,
        tls_cert=str(certs / "server.pem"),
        tls_key=str(certs / "server.key"),
        tls_ca=str(certs / "ca.pem") if mutual else "",
    )
    config.validate()
    return config


async def _check(address: str, tls: Tls | None) -> str:
    channel = (
        grpc.aio.insecure_channel(address) if tls is None else channels.aio_channel(address, tls)
    )
    async with channel:
        try:
            reply = await health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(), timeout=3
            )
        except grpc.aio.AioRpcError as exc:
            return str(exc.code().name)
    return str(health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status))


async def test_tls_server_refuses_plain_text_and_serves_verified_clients(
    certs: Path, restore_channels: None
) -> None:
    async for server in _serve(_config(certs, mutual=False)):
        assert await _check(server.address, None) == "UNAVAILABLE"
        assert await _check(server.address, Tls(ca=str(certs / "other-ca.pem"))) == "UNAVAILABLE"
        assert await _check(server.address, Tls(ca=str(certs / "ca.pem"))) == "SERVING"
        # the suite's health check uses the process's settings
        channels.use(Tls(ca=str(certs / "ca.pem")))
        assert await health(server.address, 3.0) == "SERVING"


async def test_mutual_tls_requires_a_client_certificate_of_the_ca(certs: Path) -> None:
    ca = str(certs / "ca.pem")
    async for server in _serve(_config(certs, mutual=True)):
        assert await _check(server.address, Tls(ca=ca)) == "UNAVAILABLE"
        stranger = Tls(str(certs / "stranger.pem"), str(certs / "stranger.key"), ca)
        assert await _check(server.address, stranger) == "UNAVAILABLE"
        client = Tls(str(certs / "client.pem"), str(certs / "client.key"), ca)
        assert await _check(server.address, client) == "SERVING"


def test_tls_settings_are_checked_with_the_field_named(certs: Path, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="tls_cert, tls_key: give both or neither"):
        ServiceConfig(tls_cert=str(certs / "server.pem")).validate()
    with pytest.raises(ConfigError, match=r"tls_ca: .* needs tls_cert"):
        ServiceConfig(tls_ca=str(certs / "ca.pem")).validate()
    with pytest.raises(ConfigError, match="tls_key: no such file"):
        ServiceConfig(tls_cert=str(certs / "server.pem"), tls_key=str(tmp_path / "x")).validate()
    env = {"SCEPSY_TLS_CA": "/ca.pem"}
    assert Tls.from_env(env) == Tls(ca="/ca.pem") and Tls.from_env(env).client_enabled
