"""Profiles: one LLM's per-call latency against arrival rate on one hardware configuration.

A profile belongs to a ``ProfileKey`` (model, GPU type, TP degree, GPU fraction, engine version
and the request mix it was measured with). Its points are sorted by rate and end at or just below
the saturation rate, the highest sustainable call rate. Backends (analytic simulation, real vLLM
engines) produce the same structure; the ALP reads latency at any rate by interpolation.
"""

from __future__ import annotations

import math
from bisect import bisect_left
from dataclasses import asdict, dataclass
from itertools import pairwise
from typing import Any

from services.core.errors import InvalidInputError


@dataclass(frozen=True, slots=True)
class ProfileKey:
    model: str
    gpu_type: str
    tp: int
    fraction: float  # share of one GPU; 1.0 for whole GPUs (always 1.0 when tp > 1)
    engine: str  # engine/backend version, e.g. "analytic-1" or "vllm-0.32.0"
    mix: str  # short id of the request mix (token-length distribution) profiled

    def redis_field(self) -> str:
        """Stable textual form used as the storage key suffix."""
        return (
            f"{self.model}|{self.gpu_type}|tp{self.tp}|f{self.fraction:g}|{self.engine}|{self.mix}"
        )


@dataclass(frozen=True, slots=True)
class ProfilePoint:
    rate: float  # calls/s offered to one instance
    mean_latency: float  # s, per call (arrival to last token)
    p50_latency: float
    p99_latency: float
    ttft: float  # s, mean time to first token
    tpot: float  # s, mean time per output token after the first


@dataclass(frozen=True, slots=True)
class Profile:
    key: ProfileKey
    points: tuple[ProfilePoint, ...]
    saturation_rate: float  # calls/s; the ALP's T_m for this configuration
    # calls that reached one instance together when it was measured (a fan-out profile's group;
    # 1: single calls with Poisson arrivals); the ALP adds burst costs only beyond it
    group: float = 1.0

    def __post_init__(self) -> None:
        if not self.points:
            raise InvalidInputError(f"profile {self.key.redis_field()}: points: empty")
        rates = [p.rate for p in self.points]
        if any(b <= a for a, b in pairwise(rates)):
            raise InvalidInputError(
                f"profile {self.key.redis_field()}: points: rates must increase, got {rates}"
            )
        if not self.saturation_rate > 0:
            raise InvalidInputError(
                f"profile {self.key.redis_field()}: saturation_rate: must be > 0, "
                f"got {self.saturation_rate}"
            )
        if not self.group >= 1:
            raise InvalidInputError(
                f"profile {self.key.redis_field()}: group: must be >= 1, got {self.group}"
            )

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (``from_dict`` reads it back)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Profile:
        """Inverse of ``to_dict``; raises ``InvalidInputError`` naming a missing field."""
        try:
            key = ProfileKey(**data["key"])
            points = tuple(ProfilePoint(**p) for p in data["points"])
            return cls(
                key=key,
                points=points,
                saturation_rate=float(data["saturation_rate"]),
                group=float(data.get("group", 1.0)),
            )
        except (KeyError, TypeError) as exc:
            raise InvalidInputError(f"profile: malformed document ({exc})") from None

    def ttft_at(self, rate: float) -> float:
        """Mean time to first token at ``rate`` (as ``latency_at``; its growth with the rate is
        the wait for admission, the rest of the latency's growth comes from larger batches)."""
        if rate >= self.saturation_rate:
            return math.inf
        pts = self.points
        if rate <= pts[0].rate:
            return pts[0].ttft
        i = bisect_left([p.rate for p in pts], rate)
        if i >= len(pts):
            last = pts[-1]
            return last.ttft * (self.saturation_rate - last.rate) / (self.saturation_rate - rate)
        lo, hi = pts[i - 1], pts[i]
        w = (rate - lo.rate) / (hi.rate - lo.rate)
        return lo.ttft + w * (hi.ttft - lo.ttft)

    def latency_at(self, rate: float) -> float:
        """Mean per-call latency at ``rate`` calls/s (linear interpolation between points).

        Below the first point the first point's latency holds (an idle engine); at or beyond
        saturation the latency is unbounded.
        """
        if rate >= self.saturation_rate:
            return math.inf
        pts = self.points
        if rate <= pts[0].rate:
            return pts[0].mean_latency
        i = bisect_left([p.rate for p in pts], rate)
        if i >= len(pts):
            # between the last measured point and saturation: grow like an M/M/1 queue
            last = pts[-1]
            headroom = (self.saturation_rate - last.rate) / (self.saturation_rate - rate)
            return last.mean_latency * headroom
        lo, hi = pts[i - 1], pts[i]
        w = (rate - lo.rate) / (hi.rate - lo.rate)
        return lo.mean_latency + w * (hi.mean_latency - lo.mean_latency)
