"""Profile backends: what turns (model, GPU, TP, fraction, request mix) into a ``Profile``.

A backend has a ``name`` (what configs and ``ProfileRequest.backend`` call it), an ``engine``
string that goes into every ``ProfileKey`` it produces (so profiles of different engines or model
versions never mix) and a blocking ``profile`` call. The analytic backend lives here because it
is pure; backends that drive real engines live with the profiler service, which keeps the
registry of every backend by name.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from typing import Protocol

from services.core.cluster.hardware import GpuSpec
from services.core.cluster.models import ModelSpec
from services.core.errors import InfeasibleError
from services.core.perf.analytic import ENGINE as ANALYTIC_ENGINE
from services.core.perf.analytic import (
    PLANNING_RATE_FRACTIONS,
    PLANNING_REQUESTS_PER_POINT,
    PLANNING_SATURATION_WINDOW,
    RequestMix,
    profile_analytic,
)
from services.core.perf.profile import Profile

DEFAULT_BACKEND = "analytic"
CACHE_SIZE = 4096  # analytic profiles kept in memory per process (least recently used dropped)


class ProfileBackend(Protocol):
    name: str
    engine: str

    def profile(
        self, model: ModelSpec, gpu: GpuSpec, tp: int, fraction: float, mix: RequestMix, seed: int
    ) -> Profile:
        """The profile of one instance; raises ``InfeasibleError`` when it does not fit."""
        ...


_Key = tuple[str, str, int, float, str, int, tuple[float, ...], int, tuple[float, float]]
_CACHE: OrderedDict[_Key, Profile | InfeasibleError] = OrderedDict()


class AnalyticBackend:
    """Continuous-batching simulation on the analytic performance model (no hardware).

    Profiles are computed at ``rate_fractions`` of the saturation rate with
    ``requests_per_point`` calls each (default: the planning resolution, ``analytic``), and
    remembered per process by everything they depend on (the model's and GPU's specs, TP,
    fraction, the mix, the seed and the resolution), so a re-plan or a second spec with the
    same models computes nothing again.
    """

    name = "analytic"
    engine = ANALYTIC_ENGINE

    def __init__(
        self,
        rate_fractions: Sequence[float] = PLANNING_RATE_FRACTIONS,
        requests_per_point: int = PLANNING_REQUESTS_PER_POINT,
        saturation_window: tuple[float, float] = PLANNING_SATURATION_WINDOW,
        *,
        cache: bool = True,
    ) -> None:
        self.rate_fractions = tuple(rate_fractions)
        self.requests_per_point = requests_per_point
        self.saturation_window = saturation_window
        self.cache = cache

    def key(
        self, model: ModelSpec, gpu: GpuSpec, tp: int, fraction: float, mix: RequestMix, seed: int
    ) -> _Key:
        """Everything a profile of this backend depends on (its key in the process's memory)."""
        return (
            repr(model),
            repr(gpu),
            tp,
            fraction,
            mix.id,
            seed,
            self.rate_fractions,
            self.requests_per_point,
            self.saturation_window,
        )

    def remembered(
        self, model: ModelSpec, gpu: GpuSpec, tp: int, fraction: float, mix: RequestMix, seed: int
    ) -> bool:
        """Whether ``profile`` would answer from memory (no simulation)."""
        return self.cache and self.key(model, gpu, tp, fraction, mix, seed) in _CACHE

    def remember(
        self,
        model: ModelSpec,
        gpu: GpuSpec,
        tp: int,
        fraction: float,
        mix: RequestMix,
        seed: int,
        found: Profile | InfeasibleError,
    ) -> None:
        """Keep a profile computed elsewhere (another process) as if ``profile`` had made it."""
        if self.cache:
            _CACHE[self.key(model, gpu, tp, fraction, mix, seed)] = found
            while len(_CACHE) > CACHE_SIZE:
                _CACHE.popitem(last=False)

    def profile(
        self, model: ModelSpec, gpu: GpuSpec, tp: int, fraction: float, mix: RequestMix, seed: int
    ) -> Profile:
        key = self.key(model, gpu, tp, fraction, mix, seed)
        found = _CACHE.get(key) if self.cache else None
        if found is None:
            try:
                found = profile_analytic(
                    model,
                    gpu,
                    tp,
                    fraction,
                    mix,
                    seed,
                    rate_fractions=self.rate_fractions,
                    requests_per_point=self.requests_per_point,
                    saturation_window=self.saturation_window,
                )
            except InfeasibleError as exc:
                found = exc
            self.remember(model, gpu, tp, fraction, mix, seed, found)
        elif self.cache:
            _CACHE.move_to_end(key)
        if isinstance(found, InfeasibleError):
            raise found
        return found


def clear_cache() -> None:
    """Forget every remembered analytic profile (benchmarks measure cold plans with it)."""
    _CACHE.clear()
