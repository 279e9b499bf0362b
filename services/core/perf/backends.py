"""Profile backends: what turns (model, GPU, TP, fraction, request mix) into a ``Profile``.

A backend has a ``name`` (what configs and ``ProfileRequest.backend`` call it), an ``engine``
string that goes into every ``ProfileKey`` it produces (so profiles of different engines or model
versions never mix) and a blocking ``profile`` call. The analytic backend lives here because it
is pure; backends that drive real engines live with the profiler service, which keeps the
registry of every backend by name.
"""

from __future__ import annotations

from typing import Protocol

from services.core.cluster.hardware import GpuSpec
from services.core.cluster.models import ModelSpec
from services.core.perf.analytic import ENGINE as ANALYTIC_ENGINE
from services.core.perf.analytic import RequestMix, profile_analytic
from services.core.perf.profile import Profile

DEFAULT_BACKEND = "analytic"


class ProfileBackend(Protocol):
    name: str
    engine: str

    def profile(
        self, model: ModelSpec, gpu: GpuSpec, tp: int, fraction: float, mix: RequestMix, seed: int
    ) -> Profile:
        """The profile of one instance; raises ``InfeasibleError`` when it does not fit."""
        ...


class AnalyticBackend:
    """Continuous-batching simulation on the analytic performance model (no hardware)."""

    name = "analytic"
    engine = ANALYTIC_ENGINE

    def profile(
        self, model: ModelSpec, gpu: GpuSpec, tp: int, fraction: float, mix: RequestMix, seed: int
    ) -> Profile:
        return profile_analytic(model, gpu, tp, fraction, mix, seed)
