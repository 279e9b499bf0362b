"""Per-configuration profiles for a deployment spec, computed once and kept for the process.

The planner's search and ``scepsy predict`` ask for the profile of (model, TP, fraction) many
times; ``AnalyticProfiles`` computes each with the analytic backend on first use and keeps it (and
keeps the ``InfeasibleError`` of a configuration that does not fit, raising it again). Each model
is profiled with its request mix from the spec: the token samples of every workflow calling it,
in proportion to their call rates.

A cache is an ordinary object owned by its caller (no module-level state); its counters say how
many profiles were computed and how long that took, which the search benchmark reports apart from
the search itself.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from services.core.cluster.hardware import gpu_spec
from services.core.errors import InfeasibleError
from services.core.perf.analytic import RequestMix, profile_analytic
from services.core.perf.profile import Profile
from services.core.workload.spec import Spec

# The request mix of a model that no workflow calls (it carries no load; only fit and idle
# latency matter): a moderate chat-sized call.
FALLBACK_MIX = (512, 128)


class AnalyticProfiles:
    """Profiles from the analytic backend, computed once per (model, tp, fraction).

    ``profile`` is an ``alp.ProfileLookup``. Infeasible configurations are cached too and raise
    again. ``computed`` counts profiles computed (infeasible ones included), ``hits`` lookups
    answered from the cache, ``seconds`` the time spent computing.
    """

    def __init__(self, spec: Spec, clock: Callable[[], float] = time.perf_counter) -> None:
        self.spec = spec
        self.gpu = gpu_spec(spec.gpu_type)
        self._clock = clock
        self._cache: dict[tuple[str, int, float], Profile | InfeasibleError] = {}
        self.computed = 0
        self.hits = 0
        self.seconds = 0.0

    def profile(self, model: str, tp: int, fraction: float) -> Profile:
        key = (model, tp, fraction)
        if key in self._cache:
            self.hits += 1
        else:
            self._cache[key] = self._compute(model, tp, fraction)
        found = self._cache[key]
        if isinstance(found, InfeasibleError):
            raise found
        return found

    def _compute(self, model: str, tp: int, fraction: float) -> Profile | InfeasibleError:
        started = self._clock()
        samples = self.spec.token_mix(model) or (FALLBACK_MIX,)
        mix = RequestMix.from_samples(samples)
        try:
            return profile_analytic(self.spec.models[model], self.gpu, tp, fraction, mix)
        except InfeasibleError as exc:
            return exc
        finally:
            self.computed += 1
            self.seconds += self._clock() - started
