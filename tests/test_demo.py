"""``make demo`` in CI: ``scripts/demo.py --quick --json`` on real vLLM CPU engines fails the test
when any step fails, and its JSON shows the closed loop: the control loop re-planned by itself
on the doubled rate, the engines changed as its decision said (new ones ready before old ones
stopped, or, where the new engine takes the old one's device, after it drained), and no call
failed.

The demo starts three engines, the most this machine takes: the test holds the engine lock
(``/tmp/scepsy-engines.lock``, the one ``make demo`` and manual runs take with flock(1)) while it
runs, unless a process above it already holds it (``flock LOCK pytest ...``).
"""

from __future__ import annotations

import fcntl
import json
import os
import subprocess
import sys
import threading
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[1]
LOCK = Path("/tmp/scepsy-engines.lock")
LOCK_WAIT_S = 1200.0
DEMO_DEADLINE_S = 600.0

pytestmark = [
    pytest.mark.engine,
    pytest.mark.slow,
    pytest.mark.timeout(int(LOCK_WAIT_S + DEMO_DEADLINE_S + 60)),
]


def _ancestors() -> set[int]:
    pids, pid = set(), os.getpid()
    while pid > 1:
        pids.add(pid)
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            break
        pid = int(stat.rsplit(")", 1)[1].split()[1])
    return pids


def _held_above(path: Path) -> bool:
    """True when a flock on ``path`` is held by this process or one of its ancestors."""
    inode = path.stat().st_ino
    ours = _ancestors()
    for line in Path("/proc/locks").read_text().splitlines():
        fields = [f for f in line.split() if f != "->"]  # "->": a process waiting for it
        if (
            len(fields) > 5
            and fields[1] == "FLOCK"
            and fields[5].endswith(f":{inode}")
            and int(fields[4]) in ours
        ):
            return True
    return False


@contextmanager
def engine_lock() -> Iterator[None]:
    """Hold the engine lock (blocking, so waiting in line with flock(1) users) while the body
    runs; fail after ``LOCK_WAIT_S``."""
    LOCK.touch(exist_ok=True)
    if _held_above(LOCK):
        yield
        return
    with LOCK.open("a") as handle:
        got = threading.Event()

        def take() -> None:
            fcntl.flock(handle, fcntl.LOCK_EX)
            got.set()

        threading.Thread(target=take, daemon=True).start()
        if not got.wait(LOCK_WAIT_S):
            pytest.fail(f"{LOCK} still held by another run after {LOCK_WAIT_S:g} s")
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _run_demo(out: Path) -> tuple[subprocess.CompletedProcess[str], dict[str, Any]]:
    env = {k: v for k, v in os.environ.items() if k not in ("SCEPSY_REDIS_URL", "REDIS_URL")}
    with engine_lock():
        done = subprocess.run(
            [
                sys.executable,
                str(REPO / "scripts" / "demo.py"),
                "--quick",
                "--json",
                "--out",
                str(out),
            ],
            cwd=REPO,
            env=env,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=DEMO_DEADLINE_S,
            check=False,
        )
    (out / "demo.log").write_text(done.stderr)  # the demo's tables, kept with pytest's tmp dirs
    lines = done.stdout.strip().splitlines()
    assert lines, f"no JSON on stdout (exit {done.returncode}); stderr:\n{done.stderr[-6000:]}"
    doc: dict[str, Any] = json.loads(lines[-1])
    return done, doc


def test_quick_demo_closes_the_loop_on_real_engines(vllm: Path, tmp_path: Path) -> None:
    done, doc = _run_demo(tmp_path)
    failed = [s for s in doc["steps"] if not s["ok"]]
    log = done.stderr[-6000:]
    assert done.returncode == 0 and doc["ok"] and not failed, f"{failed}\n{log}"
    assert [s["step"] for s in doc["steps"]] == [1, 2, 3, 4, 5, 6, 7], log
    steps = {s["step"]: s for s in doc["steps"]}

    # the loop re-planned by itself (nothing but `apply` of step 3 and the load ran), for the rate
    decision = doc["decision"]
    assert decision["action"] == "replan" and decision["outcome"] == "changed", decision
    assert "rate_high" in {r["kind"] for r in decision["reasons"]}, decision
    assert decision["new_plan"] and decision["new_plan"] != decision["old_plan"]
    before, after = doc["plan_before"], doc["plan_after"]
    assert after["id"] == decision["new_plan"] and before["id"] == decision["old_plan"]
    assert after["target_rps"] > before["target_rps"]

    # engines moved, as the decision said and as the two plans' allocations differ
    assert before["allocation"] != after["allocation"]
    moves = doc["moves"]
    assert moves["moved_as_decided"], (moves, decision["moves"])
    engines_before = {e["id"]: e["model"] for e in steps[3]["engines"]}
    engines_after = {e["id"]: e["model"] for e in steps[5]["engines"]}
    started = Counter(engines_after[e] for e in moves["started"])
    stopped = Counter(engines_before[e] for e in moves["stopped"])
    for model in before["allocation"]:
        change = after["allocation"][model]["replicas"] - before["allocation"][model]["replicas"]
        assert started[model] - stopped[model] == change, (model, moves)
    assert moves["started"] and moves["stopped"]

    # no request and no call failed, before, during and after the change
    drives = {
        "before": steps[4]["measured"],
        "detecting": steps[5]["load_while_detecting"],
        "applying": steps[5]["load_during_apply"],
        "after": steps[6]["measured"],
    }
    for name, measured in drives.items():
        assert measured["requests"] > 0, name
        assert measured["errors"] == 0 and measured["failed_calls"] == 0, (name, measured)
    assert steps[7]["problems"] == []
