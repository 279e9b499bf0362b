"""Host CPU accounting from /proc: the parsers on known text, the sampler on real processes."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest

from services.runtime.hostload import TICK, Sampler, between, parse_host, parse_process

STAT = """cpu  1000 10 500 8000 100 0 40 250 0 0
cpu0 500 5 250 4000 50 0 20 125 0 0
intr 12345
"""


def test_the_host_line_splits_into_busy_idle_and_steal() -> None:
    host = parse_host(STAT)
    assert host.busy == pytest.approx((1000 + 10 + 500 + 0 + 40) * TICK)
    assert host.idle == pytest.approx((8000 + 100) * TICK)
    assert host.steal == pytest.approx(250 * TICK)
    with pytest.raises(ValueError, match="no 'cpu' line"):
        parse_host("intr 1\n")


def test_a_process_line_is_read_after_its_names_last_parenthesis() -> None:
    # a command name with spaces and parentheses; pgrp 4242, utime 300, stime 50
    fields = ["S", "1", "4242", "4242", "0", "-1", "0", "0", "0", "0", "0", "300", "50"]
    text = "77 (vllm (core) x) " + " ".join(fields + ["0"] * 30)
    group, seconds = parse_process(text)
    assert group == 4242 and seconds == pytest.approx(350 * TICK)


def test_between_two_snapshots_gives_cores_and_the_stolen_share() -> None:
    from services.runtime.hostload import CpuTimes, Snapshot

    a = Snapshot(10.0, CpuTimes(busy=100.0, idle=50.0, steal=0.0), {7: 5.0, 8: 1.0})
    b = Snapshot(12.0, CpuTimes(busy=103.0, idle=50.5, steal=0.5), {7: 6.8, 8: 1.0})
    share = between(a, b)
    assert share.busy == pytest.approx(1.5)  # 3 busy CPU-seconds over 2 s
    assert share.steal == pytest.approx(0.5 / 4.0)
    assert share.groups == pytest.approx({7: 0.9, 8: 0.0})
    with pytest.raises(ValueError, match="out of order"):
        between(b, a)


def test_the_sampler_sees_a_busy_process_group_and_an_idle_one() -> None:
    burn = "import time\nend = time.monotonic() + 3\nwhile time.monotonic() < end: pass\n"
    busy = subprocess.Popen([sys.executable, "-c", burn], start_new_session=True)
    idle = subprocess.Popen(["sleep", "5"], start_new_session=True)
    sampler = Sampler({"busy": busy.pid, "idle": idle.pid}, interval_s=0.2).start()
    try:
        time.sleep(0.5)
        t0 = time.monotonic()
        time.sleep(1.5)
        t1 = time.monotonic()
        time.sleep(0.5)
    finally:
        sampler.stop()
        busy.kill()
        idle.kill()
        busy.wait()
        idle.wait()
    share = sampler.share(t0, t1)
    assert share is not None and share.seconds >= t1 - t0
    cores = sampler.cores(share)
    # a spinning process keeps most of a core even on a busy 2-core host; sleep uses none
    assert cores["busy"] > 0.3 and cores["idle"] < 0.05
    assert share.busy >= cores["busy"] - 0.05
    # a window the samples do not cover has no share
    assert sampler.share(t0 - 100, t1) is None
