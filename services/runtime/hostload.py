"""What the host's CPUs did over a stretch of time, read from Linux's ``/proc``.

A measurement on a shared host moves with the host: the same rate's runs minutes apart differ by
up to 2.6x on the 2-core machine (README, issue 11). ``Sampler`` reads, every ``interval_s``,
the CPU time of the whole host (busy, idle, and *steal*: time the hypervisor gave another
guest) and of chosen process groups (an engine started in its own session is one group: its API
server and its engine core). ``Sampler.share(t0, t1)`` then says, for a window of a benchmark,
how many cores each group used and which share of the host's CPU time was stolen: whether a
slow window was a starved engine, a busy neighbour or the engine's own queue.

CPU times come in clock ticks (``os.sysconf("SC_CLK_TCK")``); a process that exits between two
samples takes its CPU time with it (the groups here live for the whole benchmark).
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

TICK = 1.0 / os.sysconf("SC_CLK_TCK")
PROC = Path("/proc")


@dataclass(frozen=True, slots=True)
class CpuTimes:
    """All CPUs together, seconds since boot."""

    busy: float  # user, nice, system, irq, softirq
    idle: float  # idle, iowait
    steal: float  # given to another guest by the hypervisor


def parse_host(text: str) -> CpuTimes:
    """The ``cpu`` line of ``/proc/stat``."""
    for line in text.splitlines():
        fields = line.split()
        if fields and fields[0] == "cpu":
            ticks = [int(v) for v in fields[1:]] + [0] * 8
            user, nice, system, idle, iowait, irq, softirq, steal = ticks[:8]
            return CpuTimes(
                busy=(user + nice + system + irq + softirq) * TICK,
                idle=(idle + iowait) * TICK,
                steal=steal * TICK,
            )
    raise ValueError("/proc/stat: no 'cpu' line")


def parse_process(text: str) -> tuple[int, float]:
    """(process group, user + system CPU seconds) of one ``/proc/PID/stat``. The command name
    (field 2) is in parentheses and may hold spaces and parentheses: fields are counted after
    its last ')'."""
    rest = text[text.rindex(")") + 2 :].split()
    # rest[0] is field 3 (state): pgrp is field 5, utime 14, stime 15
    return int(rest[2]), (int(rest[11]) + int(rest[12])) * TICK


@dataclass(frozen=True, slots=True)
class Snapshot:
    at: float  # time.monotonic()
    host: CpuTimes
    groups: dict[int, float]  # process group -> CPU seconds of its live processes


def snapshot(groups: Iterable[int], proc: Path = PROC) -> Snapshot:
    wanted = set(groups)
    used = dict.fromkeys(wanted, 0.0)
    for entry in proc.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            group, seconds = parse_process((entry / "stat").read_text())
        except (OSError, ValueError, IndexError):
            continue  # exited while we read
        if group in wanted:
            used[group] += seconds
    return Snapshot(time.monotonic(), parse_host((proc / "stat").read_text()), used)


@dataclass(frozen=True, slots=True)
class Share:
    """One window: cores used (CPU seconds per second) and the shares of the host's time."""

    seconds: float
    busy: float  # cores, the whole host
    steal: float  # share of all CPU time, 0..1
    groups: dict[int, float]  # cores per process group


def between(a: Snapshot, b: Snapshot) -> Share:
    span = b.at - a.at
    if span <= 0:
        raise ValueError(f"snapshots out of order: {a.at} then {b.at}")
    total = (b.host.busy + b.host.idle + b.host.steal) - (a.host.busy + a.host.idle + a.host.steal)
    steal = b.host.steal - a.host.steal
    return Share(
        seconds=span,
        busy=(b.host.busy - a.host.busy) / span,
        steal=steal / total if total > 0 else 0.0,
        groups={g: max(0.0, b.groups.get(g, 0.0) - a.groups.get(g, 0.0)) / span for g in a.groups},
    )


class Sampler:
    """Snapshots of ``groups`` every ``interval_s`` in a background thread (start/stop)."""

    def __init__(self, groups: Mapping[str, int], interval_s: float = 0.5) -> None:
        if not interval_s > 0:
            raise ValueError(f"interval_s: must be > 0, got {interval_s}")
        self.names = dict(groups)  # name -> process group
        self.interval_s = interval_s
        self.samples: list[Snapshot] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="hostload", daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.samples.append(snapshot(self.names.values()))
            self._stop.wait(self.interval_s)

    def start(self) -> Sampler:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def share(self, t0: float, t1: float) -> Share | None:
        """The window [t0, t1] (``time.monotonic()``), between the last sample at or before t0
        and the first at or after t1; None when the samples do not cover it."""
        samples = list(self.samples)
        before = [s for s in samples if s.at <= t0]
        after = [s for s in samples if s.at >= t1]
        if not before or not after:
            return None
        return between(before[-1], after[0])

    def cores(self, share: Share) -> dict[str, float]:
        """``share``'s cores per group, by name."""
        return {name: share.groups.get(group, 0.0) for name, group in self.names.items()}
