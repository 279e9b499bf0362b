"""Request arrival times: Poisson, or replayed from production traces and rescaled to a rate.

``poisson(rate, n, seed)`` draws exponential gaps. ``poisson_at(rate, n, seed)`` is the same
process conditioned on its n arrivals spanning exactly (n - 1) / ``rate`` seconds (the gaps scaled
to that sum: uniform order statistics in between), so that a finite run offers exactly ``rate``:
n exponential gaps sum to within 1/sqrt(n) of their mean (+-1.9% at 2,870 requests, one standard
deviation), which near capacity decides whether a run keeps up.
``replay(times, rate, n)`` keeps the burstiness
of a recorded arrival process (gaps relative to each other) but stretches it to a mean rate of
``rate`` requests/s: the recorded times, shifted to start at 0, are scaled by
(recorded rate / ``rate``); when more than the recorded requests are asked for, the recording is
repeated end to end (one mean gap between copies).

Recorded timestamps come from the public traces in ``../shared/data`` (read in place, never
copied):

- ``azure-llm-trace-2023``: CSV with a ``TIMESTAMP`` column (``2023-11-16 18:15:46.6805900``);
- ``mooncake-trace``: JSON lines with ``timestamp`` in milliseconds.

``parse_azure`` and ``parse_mooncake`` turn lines into seconds from the first request;
``load_timestamps`` picks the parser by file name and reads the file.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Iterable
from datetime import datetime
from pathlib import Path

import numpy as np

from services.core.errors import InvalidInputError
from services.core.perf.model import FloatArray


def poisson(rate: float, n: int, seed: int) -> FloatArray:
    """``n`` arrival times (s) of a Poisson process of ``rate`` per second; the first at 0."""
    _check(rate, n)
    gaps = np.random.default_rng([seed, 0xA1]).exponential(1.0 / rate, size=n)
    times: FloatArray = np.cumsum(gaps) - gaps[0]
    return times


def poisson_at(rate: float, n: int, seed: int) -> FloatArray:
    """``poisson(rate, n, seed)`` scaled to span exactly (n - 1) / ``rate`` s (module docstring);
    for ``n`` = 1 the one arrival at 0."""
    times = poisson(rate, n, seed)
    if n > 1 and times[-1] > 0:
        times = times * ((n - 1) / rate / float(times[-1]))
    return times


def replay(times: FloatArray, rate: float, n: int) -> FloatArray:
    """``n`` arrival times following the recorded ``times`` (module docstring)."""
    _check(rate, n)
    recorded = np.sort(np.asarray(times, dtype=np.float64))
    if len(recorded) < 2 or recorded[-1] <= recorded[0]:
        raise InvalidInputError("replay: need at least two distinct recorded timestamps")
    recorded = recorded - recorded[0]
    span = float(recorded[-1])
    gap = span / (len(recorded) - 1)  # the recording's mean gap
    copies = -(-n // len(recorded))
    tiled = np.concatenate([recorded + i * (span + gap) for i in range(copies)])[:n]
    return tiled * (1.0 / gap) / rate


def parse_azure(lines: Iterable[str], source: str = "azure trace") -> FloatArray:
    """Seconds from the first request of an Azure LLM inference trace (CSV, ``TIMESTAMP``)."""
    reader = csv.DictReader(lines)
    if reader.fieldnames is None or "TIMESTAMP" not in reader.fieldnames:
        raise InvalidInputError(f"{source}: no TIMESTAMP column")
    stamps: list[float] = []
    for number, row in enumerate(reader, start=2):
        raw = row["TIMESTAMP"]
        try:
            day, _, frac = raw.partition(".")
            base = datetime.strptime(day, "%Y-%m-%d %H:%M:%S").timestamp()
            stamps.append(base + (float("0." + frac) if frac else 0.0))
        except ValueError:
            raise InvalidInputError(f"{source} line {number}: bad TIMESTAMP {raw!r}") from None
    return _relative(stamps, source)


def parse_mooncake(lines: Iterable[str], source: str = "mooncake trace") -> FloatArray:
    """Seconds from the first request of a Mooncake trace (JSON lines, ``timestamp`` in ms)."""
    stamps: list[float] = []
    for number, raw in enumerate(lines, start=1):
        if not raw.strip():
            continue
        try:
            stamps.append(float(json.loads(raw)["timestamp"]) / 1000.0)
        except (json.JSONDecodeError, KeyError, TypeError, ValueError):
            raise InvalidInputError(f"{source} line {number}: no numeric 'timestamp'") from None
    return _relative(stamps, source)


def load_timestamps(path: str | Path) -> FloatArray:
    """Recorded arrival times (s from the first) of an Azure CSV or a Mooncake JSONL file."""
    p = Path(path)
    parser = parse_azure if p.suffix == ".csv" else parse_mooncake
    try:
        with open(p, encoding="utf-8") as handle:
            return parser(handle, source=str(p))
    except OSError as exc:
        raise InvalidInputError(f"arrivals {str(p)!r}: cannot read: {exc.strerror}") from None


def _relative(stamps: list[float], source: str) -> FloatArray:
    if not stamps:
        raise InvalidInputError(f"{source}: no requests")
    arr = np.sort(np.asarray(stamps, dtype=np.float64))
    relative: FloatArray = arr - arr[0]
    return relative


def _check(rate: float, n: int) -> None:
    if not rate > 0:
        raise InvalidInputError(f"rate: must be > 0, got {rate}")
    if n < 1:
        raise InvalidInputError(f"requests: must be >= 1, got {n}")
