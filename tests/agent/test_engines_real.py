"""Plans become real vLLM CPU engines: ``scepsy up`` on a declared ``cpu`` node that is this host,
``scepsy apply``, and OpenAI clients talking to the engines through the router.

The node has three ``cpu`` devices and k = 1, so every plan runs three engines (this machine's
limit). At a low rate the plan runs gen x1 and rerank x2, at a higher one gen x2 and rerank x1 (the
rates are read off offline plans): the
change keeps two engines, stops one rerank and starts one gen, with a rerank and a gen serving
throughout. Each test starts by applying the state it needs, so none depends on another's.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pytest

from protos.scepsy.v1 import agent_pb2, agent_pb2_grpc
from protos.scepsy.v1 import types_pb2 as pb
from services.runtime import cpu_rag
from services.runtime.cpu_rag import CLUSTER
from services.runtime.engines import process_group_alive, run_engine_module

pytestmark = [pytest.mark.engine, pytest.mark.timeout(900)]

REPO = Path(__file__).resolve().parents[2]
SCEPSY = [sys.executable, "-m", "services.cli.main"]
READY = pb.ENGINE_STATE_READY


@dataclass
class Suite:
    home: Path
    env: dict[str, str]
    tiny: Path
    agent_argv: list[str] = field(default_factory=list)
    agent_environ: dict[str, str] = field(default_factory=dict)
    restarted: list[subprocess.Popen[bytes]] = field(default_factory=list)
    low: float = 0.2  # a rate the planner serves with gen x1, rerank x2
    high: float = 0.5  # and one with gen x2, rerank x1

    def scepsy(self, *args: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [*SCEPSY, *args],
            env=self.env,
            cwd=self.home,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )

    def state(self) -> dict[str, Any]:
        doc: dict[str, Any] = json.loads((self.home / "state.json").read_text())
        return doc

    @property
    def router(self) -> str:
        return f"http://{self.state()['services']['router']['http_address']}/v1"

    @property
    def agent_address(self) -> str:
        return str(self.state()["services"]["agent/local"]["address"])

    @property
    def agent_pid(self) -> int:
        return int(self.state()["services"]["agent/local"]["pid"])

    def spec(self, rate: float, rerank_weights: str | None = None) -> Path:
        path = self.home / f"spec-{rate}-{'broken' if rerank_weights else 'ok'}.yaml"
        models = cpu_rag.Models(str(self.tiny), rerank_weights or str(self.tiny))
        path.write_text(cpu_rag.spec_text(models, rate))
        return path

    def apply(self, rate: float, *extra: str, rerank_weights: str | None = None) -> Any:
        done = self.scepsy(
            "apply", "--spec", str(self.spec(rate, rerank_weights)), "--json", *extra
        )
        return done

    def engines(self) -> list[pb.Engine]:
        with grpc.insecure_channel(self.agent_address) as channel:
            reply = agent_pb2_grpc.NodeAgentStub(channel).ListEngines(
                agent_pb2.ListEnginesRequest(), timeout=10
            )
        return list(reply.engines)

    def ready(self) -> dict[str, pb.Engine]:
        return {e.id: e for e in self.engines() if e.state == READY}

    def ensure_agent(self) -> None:
        """Start the node agent again (same command line and environment) if a test stopped it."""
        pid = self.agent_pid
        if pid and _alive(pid):
            return
        with open(self.home / "agent-restarted.log", "ab") as log:
            process = subprocess.Popen(
                self.agent_argv,
                env=self.agent_environ,
                cwd=self.home,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=log,
                start_new_session=True,
            )
        self.restarted.append(process)
        state = self.state()
        state["services"]["agent/local"]["pid"] = process.pid
        state["processes"].append({"role": "agent", "node": "local", "pid": process.pid})
        (self.home / "state.json").write_text(json.dumps(state))
        _wait(lambda: _agent_answers(self), 60, "restarted agent serving")


def _alive(pid: int) -> bool:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return False
    return fields[0] != "Z"


def _agent_answers(suite: Suite) -> bool:
    try:
        suite.engines()
    except grpc.RpcError:
        return False
    return True


def _wait(check: Any, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.5)


def _restart_agent_record(suite: Suite, pid: int) -> None:
    """Remember how the agent was started, from /proc, to start it again later."""
    raw = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    argv = [a.decode() for a in raw if a]
    # the same address again, so that the suite's state file stays true
    port = suite.agent_address.rsplit(":", 1)[1]
    if "--port" in argv:
        argv[argv.index("--port") + 1] = port
    else:
        argv += ["--port", port]
    suite.agent_argv = argv
    environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    suite.agent_environ = dict(e.decode().split("=", 1) for e in environ if e and b"=" in e)


@pytest.fixture(scope="module")
def suite(vllm: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Suite]:
    home = tmp_path_factory.mktemp("scepsy-home")
    tiny = home / "tiny"
    run_engine_module("services.profiler.tiny_model", ["--out", str(tiny)])
    (home / "cluster.yaml").write_text(CLUSTER)
    # the control loop would re-plan on the tests' own load: these tests apply by hand
    env = {**os.environ, "SCEPSY_HOME": str(home), "PYTHONPATH": str(REPO), "SCEPSY_LOOP": "off"}
    env.pop("SCEPSY_REDIS_URL", None)
    env.pop("REDIS_URL", None)
    s = Suite(home, env, tiny)
    s.low, s.high = _rates(s)
    up = s.scepsy("up", "--cluster", str(home / "cluster.yaml"), timeout=180)
    assert up.returncode == 0, up.stderr
    _restart_agent_record(s, s.agent_pid)
    try:
        yield s
    finally:
        s.scepsy("down", timeout=180)
        for process in s.restarted:
            process.wait(timeout=60)
        leftover = [
            p
            for p in Path("/proc").iterdir()
            if p.name.isdigit() and str(home).encode() in _cmdline(p)
        ]
        assert not leftover, f"processes left after down: {[p.name for p in leftover]}"


def _rates(suite: Suite) -> tuple[float, float]:
    """A low and a high rate whose plans are gen x1 + rerank x2 and gen x2 + rerank x1 (read
    off offline plans, so the tests follow the performance model wherever it goes)."""
    found = cpu_rag.flip(cpu_rag.Models(str(suite.tiny), str(suite.tiny)))
    if found is None:
        pytest.fail("no rates give gen x1/rerank x2 and gen x2/rerank x1 (offline plans)")
    return found.low.rate, found.high.rate


def _cmdline(proc: Path) -> bytes:
    try:
        return (proc / "cmdline").read_bytes()
    except OSError:
        return b""


class Load:
    """Calls through the router, one thread per model, until stopped."""

    def __init__(self, base_url: str, models: tuple[str, ...] = ("gen", "rerank")) -> None:
        from openai import OpenAI

        self.client = OpenAI(base_url=base_url, api_key="unused", timeout=60, max_retries=0)
        self.ok = 0
        self.errors: list[str] = []
        self._stop = threading.Event()
        self._threads = [
            threading.Thread(target=self._run, args=(model,), daemon=True) for model in models
        ]

    def _run(self, model: str) -> None:
        while not self._stop.is_set():
            try:
                reply = self.client.completions.create(model=model, prompt="hello", max_tokens=4)
                assert reply.choices[0].text is not None
                self.ok += 1
            except Exception as exc:  # every failure is a finding
                self.errors.append(f"{model}: {exc!r}")
            time.sleep(0.5)  # bounded: a few calls/s, leaving the 2 cores room for a new engine

    def __enter__(self) -> Load:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=90)


def _apply_ok(suite: Suite, rate: float) -> dict[str, Any]:
    suite.ensure_agent()
    done = suite.apply(rate, "--wait", "--timeout", "420")
    assert done.returncode == 0, done.stderr + done.stdout
    doc: dict[str, Any] = json.loads(done.stdout)
    return doc


def test_apply_serves_both_models_then_a_higher_rate_changes_only_what_must(
    suite: Suite,
) -> None:
    first = _apply_ok(suite, suite.low)
    ready = suite.ready()
    assert sorted(e.model for e in ready.values()) == ["gen", "rerank", "rerank"]
    assert all(e.endpoint.startswith("http://127.0.0.1:") for e in ready.values())
    assert len({tuple(e.cpus) for e in ready.values()}) == 2  # gen alone on its core
    for e in ready.values():  # every process of an engine (not only its OpenMP threads) on them
        allowed = {frozenset(os.sched_getaffinity(pid)) for pid in process_group_alive(e.pid)}
        assert allowed == {frozenset(e.cpus)}, (e.id, allowed)
    from openai import OpenAI

    client = OpenAI(base_url=suite.router, api_key="unused", timeout=60, max_retries=0)
    assert sorted(m.id for m in client.models.list().data) == ["gen", "rerank"]
    for model in ("gen", "rerank"):
        reply = client.completions.create(model=model, prompt="hello", max_tokens=4)
        assert reply.usage is not None and reply.usage.completion_tokens == 4

    again = suite.apply(suite.low, "--wait", "--timeout", "60")
    assert again.returncode == 0, again.stderr
    change = json.loads(again.stdout)["change"]
    assert (change["started"], change["stopped"]) == ([], [])
    assert set(change["kept"]) == set(ready)

    # calls to the model that loses an engine: its drained engine must not fail one (on 2 cores
    # a new engine starts slowly beside one serving load on its core, so gen is left idle)
    with Load(suite.router, ("rerank",)) as load:
        time.sleep(2)
        second = _apply_ok(suite, suite.high)
        time.sleep(2)
    change = second["change"]
    assert len(change["kept"]) == 2 and set(change["kept"]) < set(ready)
    assert [e.split("-")[0] for e in change["started"]] == ["gen"]
    assert [e.split("-")[0] for e in change["stopped"]] == ["rerank"]
    now = suite.ready()
    assert sorted(e.model for e in now.values()) == ["gen", "gen", "rerank"]
    assert set(change["kept"]) < set(now)
    assert load.errors == [] and load.ok > 4, (load.ok, load.errors[:5])
    assert first["plan"] != second["plan"]


def test_killed_engine_is_restarted_while_the_other_replica_serves(suite: Suite) -> None:
    _apply_ok(suite, suite.low)
    ready = suite.ready().values()
    # the rerank engine alone on its core: it restarts without a busy neighbour
    victim = next(
        e
        for e in ready
        if e.model == "rerank" and not any(set(e.cpus) & set(o.cpus) for o in ready if o.id != e.id)
    )
    with Load(suite.router, ("rerank",)) as load:
        time.sleep(1)
        os.killpg(victim.pid, signal.SIGKILL)

        def restarted() -> bool:
            engine = suite.ready().get(victim.id)
            return engine is not None and engine.restarts == 1 and engine.pid != victim.pid

        _wait(restarted, 300, "the killed engine restarted and ready")
        time.sleep(1)
    engine = suite.ready()[victim.id]
    assert "exited" in engine.last_error
    assert load.errors == [] and load.ok > 4, (load.ok, load.errors[:5])


def test_engine_that_cannot_start_is_failed_and_named(suite: Suite) -> None:
    _apply_ok(suite, suite.high)
    empty = suite.home / "not-a-model"
    empty.mkdir(exist_ok=True)
    done = suite.apply(suite.high, "--wait", "--timeout", "420", rerank_weights=str(empty))
    assert done.returncode == 1
    failed = [e for e in suite.engines() if e.state == pb.ENGINE_STATE_FAILED]
    assert [e.model for e in failed] == ["rerank"]
    assert f"engine {failed[0].id} on local failed" in done.stderr
    assert "before becoming healthy" in failed[0].last_error
    assert failed[0].log_path in done.stderr
    assert sorted(e.model for e in suite.ready().values()) == ["gen", "gen"]  # they stay up


def test_agent_crash_adopts_engines_and_sigterm_stops_them(suite: Suite) -> None:
    _apply_ok(suite, suite.low)
    before = suite.ready()
    pids = {e.id: e.pid for e in before.values()}
    os.kill(suite.agent_pid, signal.SIGKILL)
    _wait(lambda: not _alive(suite.agent_pid), 10, "agent gone")
    assert all(process_group_alive(pid) for pid in pids.values())  # engines outlive it
    suite.ensure_agent()
    _wait(lambda: set(suite.ready()) == set(pids), 120, "engines adopted and ready")
    assert {e.id: e.pid for e in suite.ready().values()} == pids  # adopted, not restarted
    engine_dir = str(suite.home / "engines" / "local").encode()
    vllms = [p for p in Path("/proc").iterdir() if p.name.isdigit() and b"vllm" in _cmdline(p)]
    serving = [
        p for p in vllms if b"serve" in _cmdline(p) and str(suite.tiny).encode() in _cmdline(p)
    ]
    assert len(serving) == 3, [_cmdline(p) for p in serving]  # nothing doubled
    assert engine_dir  # engine logs live under the agent's engine dir

    os.kill(suite.agent_pid, signal.SIGTERM)
    _wait(lambda: not _alive(suite.agent_pid), 90, "agent stopped")
    assert not any(process_group_alive(pid) for pid in pids.values())
    listed = suite.scepsy("endpoints", "list", "--json")
    assert listed.returncode == 0, listed.stderr
    assert json.loads(listed.stdout) in ([], {"endpoints": []})
