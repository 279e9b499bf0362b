"""Profiler backends: plugins that turn (model, GPU, TP, fraction, request mix) into a Profile.

A backend is a small object with a ``name`` (the value of ``ProfileRequest.backend``), the
``engine`` string that goes into every ProfileKey it produces (so profiles of different engines
never mix), and a blocking ``profile`` call. ``BACKENDS`` is the registry keyed by name.
"""

from __future__ import annotations

from typing import Protocol

from services.core.cluster.hardware import GpuSpec
from services.core.cluster.models import ModelSpec
from services.core.perf.analytic import ENGINE as ANALYTIC_ENGINE
from services.core.perf.analytic import RequestMix, profile_analytic
from services.core.perf.profile import Profile


class ProfilerBackend(Protocol):
    name: str
    engine: str

    def profile(
        self, model: ModelSpec, gpu: GpuSpec, tp: int, fraction: float, mix: RequestMix, seed: int
    ) -> Profile: ...


class AnalyticBackend:
    """Continuous-batching simulation on the analytic performance model (no hardware)."""

    name = "analytic"
    engine = ANALYTIC_ENGINE

    def profile(
        self, model: ModelSpec, gpu: GpuSpec, tp: int, fraction: float, mix: RequestMix, seed: int
    ) -> Profile:
        return profile_analytic(model, gpu, tp, fraction, mix, seed)


BACKENDS: dict[str, ProfilerBackend] = {b.name: b for b in (AnalyticBackend(),)}
