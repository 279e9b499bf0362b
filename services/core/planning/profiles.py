"""The one profile source of a plan: per (model, TP, fraction), the stored profile, else a new one.

The search asks for the profile of (model, TP, fraction) many times. ``SpecProfiles`` turns each
ask into a ``ProfileQuery`` (the model's architecture, the spec's GPU type, the configuration,
the model's request mix from the spec and the backend), hands it to a ``ProfileProvider`` once,
and keeps the answer (a configuration that does not fit keeps its ``InfeasibleError`` and raises
it again). It also counts where each model's profiles came from, which a plan records.

Providers:

- ``StoreFirst``: the profile stored under the query's key if there is one, else computed with
  the backend of that name (and stored, when it can store). The planner without a Profiler
  service, the CLI's offline ``plan``, the simulator and ``predict`` use it;
- the planner's client of the Profiler service (``services.planner.clients``), which does the
  same on the profiler's side and reports whether the profile was stored or computed.

Each model is profiled with its request mix from the spec: the token samples of every workflow
calling it, in proportion to their call rates (``Spec.token_mix``).
"""

from __future__ import annotations

import os
import time
from collections import Counter, OrderedDict
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from functools import partial
from typing import Any, Protocol

from services.core.cluster.hardware import GpuSpec, gpu_spec
from services.core.cluster.models import ModelSpec
from services.core.errors import InfeasibleError, InvalidInputError
from services.core.perf.analytic import RequestMix, burst_latencies
from services.core.perf.backends import DEFAULT_BACKEND, AnalyticBackend, ProfileBackend
from services.core.perf.model import PerfModel
from services.core.perf.profile import Profile, ProfileKey
from services.core.planning.alp import BurstTable
from services.core.planning.space import instance_configs, max_tp_of
from services.core.workload.spec import Spec

# The request mix of a model that no workflow calls (it carries no load; only fit and idle
# latency matter): a moderate chat-sized call.
FALLBACK_MIX = (512, 128)
STORED, COMPUTED = "stored", "computed"


@dataclass(frozen=True, slots=True)
class ProfileQuery:
    """One profile to find: a model's instance configuration under a request mix."""

    name: str  # the model's name in the spec (calls and traces use it)
    model: ModelSpec
    gpu: GpuSpec
    tp: int
    fraction: float
    mix: RequestMix
    backend: str = DEFAULT_BACKEND
    seed: int = 0

    def key(self, engine: str) -> ProfileKey:
        """The storage key of this query's profile as measured by ``engine``."""
        return ProfileKey(
            self.model.name, self.gpu.name, self.tp, self.fraction, engine, self.mix.id
        )


@dataclass(frozen=True, slots=True)
class Found:
    """A provider's answer: the profile and how it was got (``STORED`` or ``COMPUTED``)."""

    profile: Profile
    how: str

    @property
    def origin(self) -> str:
        """e.g. ``stored analytic-1``: how, and the engine that measured it."""
        return f"{self.how} {self.profile.key.engine}"


class ProfileProvider(Protocol):
    def fetch(self, query: ProfileQuery) -> Found:
        """The query's profile; raises ``InfeasibleError`` when the instance does not fit."""
        ...


class StoreFirst:
    """A ``ProfileProvider``: the profile stored under the query's key, else the backend's.

    ``get`` reads a stored profile (None when there is none); ``put`` stores a computed one
    (optional). Both are plain callables, so core stays free of I/O: the caller binds them to
    its store. ``backends`` is the registry by name (default: the analytic backend only).
    """

    def __init__(
        self,
        backends: Mapping[str, ProfileBackend] | None = None,
        get: Callable[[ProfileKey], Profile | None] | None = None,
        put: Callable[[Profile], None] | None = None,
    ) -> None:
        self._backends = dict(backends or {AnalyticBackend.name: AnalyticBackend()})
        self._get = get
        self._put = put

    def backend(self, name: str) -> ProfileBackend:
        if name not in self._backends:
            raise InvalidInputError(
                f"backend: must be one of {', '.join(sorted(self._backends))}, got {name!r}"
            )
        return self._backends[name]

    def stored(self, query: ProfileQuery) -> Profile | None:
        """The profile stored under the query's key, if any (None without a store)."""
        if self._get is None:
            return None
        return self._get(query.key(self.backend(query.backend).engine))

    def fetch(self, query: ProfileQuery) -> Found:
        backend = self.backend(query.backend)
        if self._get is not None:
            stored = self._get(query.key(backend.engine))
            if stored is not None:
                return Found(stored, STORED)
        profile = backend.profile(
            query.model, query.gpu, query.tp, query.fraction, query.mix, query.seed
        )
        if self._put is not None:
            self._put(profile)
        return Found(profile, COMPUTED)


_Fetched = tuple[Found | None, str]  # (the answer, or None and why the instance does not fit)
# map(function, queries): the builtin, or a process pool's
Mapper = Callable[[Callable[[ProfileQuery], Any], list[ProfileQuery]], Iterable[Any]]
BURST_CACHE_SIZE = 4096
_BURSTS: OrderedDict[tuple[str, str, int, float, str, int], BurstTable] = OrderedDict()


def clear_burst_cache() -> None:
    """Forget every remembered burst table and request mix (benchmarks measure cold plans)."""
    _BURSTS.clear()
    _MIXES.clear()


# token mix -> its RequestMix (hashing the id of a thousand samples costs a re-plan ~10 ms per
# LLM otherwise); bounded: cleared when it grows past _MIXES_MAX entries
_MIXES: dict[tuple[tuple[int, int], ...], RequestMix] = {}
_MIXES_MAX = 4096


def request_mix(samples: tuple[tuple[int, int], ...]) -> RequestMix:
    """``RequestMix.from_samples`` remembered per process by the samples."""
    found = _MIXES.get(samples)
    if found is None:
        if len(_MIXES) >= _MIXES_MAX:
            _MIXES.clear()
        found = _MIXES[samples] = RequestMix.from_samples(samples)
    return found


PARALLEL_MIN_COLD = 8  # fewer cold profiles than this are computed in the planning process


def available_cpus() -> int:
    """The CPUs this process may run on (its affinity mask; ``os.cpu_count`` elsewhere)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def spec_configs(spec: Spec) -> list[tuple[str, int, float]]:
    """Every (model, tp, fraction) the search may ask about for ``spec``: its configurations
    (``space.instance_configs`` up to the largest NVLink domain) of every model a workflow
    calls."""
    k = spec.fraction_unit
    pairs = instance_configs(k, max_tp_of(spec.nodes))
    called = sorted({d.model for w in spec.workflows for d in w.demand.llms})
    return [(m, tp, units / k) for m in called for tp, units in pairs]


def compute_profile(backend: AnalyticBackend, query: ProfileQuery) -> Profile | str:
    """A profile computed by ``backend`` alone (what a worker process runs), or why the
    instance does not fit (a message: it crosses processes as a value)."""
    try:
        return backend.profile(
            query.model, query.gpu, query.tp, query.fraction, query.mix, query.seed
        )
    except InfeasibleError as exc:
        return str(exc)


def fetch_one(provider: ProfileProvider, query: ProfileQuery) -> _Fetched:
    """``provider.fetch(query)`` with a misfit as a value (for ``SpecProfiles.prefetch``)."""
    try:
        return provider.fetch(query), ""
    except InfeasibleError as exc:
        return None, str(exc)


class SpecProfiles:
    """The profiles of a spec's models, each configuration fetched once from ``provider``.

    ``profile`` is an ``alp.ProfileLookup``. ``origins`` counts, per model, where its profiles
    came from (``{"generator": {"stored analytic-1": 3, "computed analytic-1": 9}}``);
    ``computed`` counts fetches (infeasible ones included), ``hits`` lookups answered from
    memory, ``seconds`` the time spent fetching.
    """

    def __init__(
        self,
        spec: Spec,
        provider: ProfileProvider | None = None,
        *,
        backend: str = DEFAULT_BACKEND,
        clock: Callable[[], float] = time.perf_counter,
    ) -> None:
        self.spec = spec
        self.gpu = gpu_spec(spec.gpu_type)
        self.provider = provider or StoreFirst()
        self.backend = backend
        self._clock = clock
        self._cache: dict[tuple[str, int, float], Profile | InfeasibleError] = {}
        self._bursts: dict[tuple[str, int, float], BurstTable] = {}
        self._mixes: dict[str, RequestMix] = {}
        self._origins: dict[str, Counter[str]] = {}
        self.computed = 0
        self.hits = 0
        self.seconds = 0.0

    def query(self, model: str, tp: int, fraction: float) -> ProfileQuery:
        """What ``profile(model, tp, fraction)`` asks the provider for."""
        if model not in self.spec.models:
            raise InvalidInputError(f"model: {model!r} is not in the spec's models")
        mix = self._mixes.get(model)
        if mix is None:
            mix = request_mix(tuple(self.spec.token_mix(model)) or (FALLBACK_MIX,))
            self._mixes[model] = mix
        spec = self.spec.models[model]
        return ProfileQuery(model, spec, self.gpu, tp, fraction, mix, self.backend)

    def profile(self, model: str, tp: int, fraction: float) -> Profile:
        key = (model, tp, fraction)
        if key in self._cache:
            self.hits += 1
        else:
            self._cache[key] = self._fetch(model, tp, fraction)
        found = self._cache[key]
        if isinstance(found, InfeasibleError):
            raise found
        return found

    def burst(self, model: str, tp: int, fraction: float) -> BurstTable:
        """An ``alp.BurstLookup``: per-call latency of calls handed to an idle instance together
        (``analytic.burst_latencies``), from the analytic performance model and the model's
        request mix, whatever backend measured the profiles (a profile says nothing about
        bursts). Remembered per process by what it depends on (model and GPU specs, TP,
        fraction, mix, seed); ``InfeasibleError`` when the instance does not fit."""
        key = (model, tp, fraction)
        found = self._bursts.get(key)
        if found is None:
            query = self.query(model, tp, fraction)
            shared = (repr(query.model), repr(query.gpu), tp, fraction, query.mix.id, query.seed)
            found = _BURSTS.get(shared)
            if found is None:
                started = self._clock()
                perf = PerfModel.create(query.model, query.gpu, tp, fraction)
                found = BurstTable.of(burst_latencies(perf, query.mix, query.seed))
                self.seconds += self._clock() - started
                _BURSTS[shared] = found
                while len(_BURSTS) > BURST_CACHE_SIZE:
                    _BURSTS.popitem(last=False)
            self._bursts[key] = found
        return found

    def cold(self, configs: Iterable[tuple[str, int, float]]) -> list[tuple[str, int, float]]:
        """The configurations (model, tp, fraction) of ``configs`` whose profile would be
        computed: not known here, not stored, not remembered by the analytic backend (with a
        provider other than ``StoreFirst`` over the analytic backend: every unknown one)."""
        todo = [c for c in dict.fromkeys(configs) if c not in self._cache]
        provider = self.provider
        if not isinstance(provider, StoreFirst):
            return todo
        backend = provider.backend(self.backend)
        if not isinstance(backend, AnalyticBackend):
            return todo
        out = []
        for config in todo:
            q = self.query(*config)
            if backend.remembered(q.model, q.gpu, q.tp, q.fraction, q.mix, q.seed):
                continue
            if provider.stored(q) is None:
                out.append(config)
        return out

    def prefetch(
        self,
        configs: Iterable[tuple[str, int, float]],
        mapper: Mapper,
    ) -> None:
        """Fetch the profiles of ``configs`` (model, tp, fraction) not yet known, all at once
        through ``mapper`` (``map`` of a process pool computes cold profiles in parallel).
        With ``StoreFirst`` over the analytic backend only the cold profiles (``cold``) go
        through ``mapper``, computed by the backend alone (store access stays here), and the
        backend remembers them; otherwise (or when that backend does not remember profiles)
        the provider itself goes through ``mapper`` (it must then pickle).
        Later ``profile`` calls find them."""
        todo = [c for c in dict.fromkeys(configs) if c not in self._cache]
        if not todo:
            return
        started = self._clock()
        provider = self.provider
        backend = provider.backend(self.backend) if isinstance(provider, StoreFirst) else None
        if isinstance(backend, AnalyticBackend) and backend.cache:
            # models with the same specs and mix share their profiles: each is computed once
            unique: dict[object, ProfileQuery] = {}
            for config in self.cold(todo):
                q = self.query(*config)
                unique.setdefault(backend.key(q.model, q.gpu, q.tp, q.fraction, q.mix, q.seed), q)
            cold = list(unique.values())
            computed: list[Profile | str] = list(mapper(partial(compute_profile, backend), cold))
            for q, made in zip(cold, computed, strict=True):
                got = InfeasibleError(made) if isinstance(made, str) else made
                backend.remember(q.model, q.gpu, q.tp, q.fraction, q.mix, q.seed, got)
            results = [fetch_one(provider, self.query(*c)) for c in todo]
        else:
            queries = [self.query(*c) for c in todo]
            results = list(mapper(partial(fetch_one, self.provider), queries))
        self.computed += len(todo)
        self.seconds += self._clock() - started
        for config, (found, problem) in zip(todo, results, strict=True):
            if found is None:
                self._cache[config] = InfeasibleError(problem)
                continue
            self._cache[config] = found.profile
            self._origins.setdefault(config[0], Counter())[found.origin] += 1

    def fits(self, model: str, tp: int, fraction: float) -> bool:
        """Whether an instance holds the weights, a minimum KV cache and the longest call."""
        try:
            self.profile(model, tp, fraction)
        except InfeasibleError:
            return False
        return True

    def known(self) -> list[Profile]:
        """Every profile fetched so far (to store or hand to another ``SpecProfiles``)."""
        return [p for p in self._cache.values() if isinstance(p, Profile)]

    def origins(self) -> dict[str, dict[str, int]]:
        return {m: dict(sorted(c.items())) for m, c in sorted(self._origins.items())}

    def _fetch(self, model: str, tp: int, fraction: float) -> Profile | InfeasibleError:
        started = self._clock()
        try:
            found = self.provider.fetch(self.query(model, tp, fraction))
        except InfeasibleError as exc:
            return exc
        finally:
            self.computed += 1
            self.seconds += self._clock() - started
        self._origins.setdefault(model, Counter())[found.origin] += 1
        return found.profile
