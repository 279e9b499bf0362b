"""The profiler service: ``scepsy.v1.Profiler`` over the backend registry, with profiles stored
in Redis under their ProfileKey (model, GPU type, TP, fraction, engine, request mix).

``Profile`` returns the stored profile unless ``refresh`` is set; otherwise it runs the backend
(a measured one in a worker thread: it takes minutes; an analytic one, an exact simulation in
Python, in the process's worker pool when it has one, ``ProfilerConfig.profile_workers``, so
concurrent calls compute in parallel) and stores the result; a ``vllm`` profile is stored with
its measurement (``Store.put_measured_profile``). Validation errors name the field.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import replace

import grpc

from protos.scepsy.v1 import profiler_pb2, profiler_pb2_grpc
from services.core.cluster.hardware import gpu_spec
from services.core.cluster.models import resolve_model
from services.core.errors import InfeasibleError, InvalidInputError, NotFoundError
from services.core.perf.analytic import RequestMix
from services.core.perf.backends import AnalyticBackend, ProfileBackend
from services.core.perf.profile import Profile, ProfileKey
from services.core.planning.profiles import ProfileQuery, compute_profile
from services.profiler.backends import BACKENDS
from services.profiler.metrics import ProfilerMetrics
from services.profiler.vllm_backend import VllmBackend
from services.runtime.convert import model_from_pb, profile_key_from_pb, profile_to_pb
from services.runtime.logging import get_logger
from services.runtime.profile_pool import ProfilePool
from services.runtime.server import ServiceBinding
from services.runtime.store import Store

log = get_logger(__name__)
TP_DEGREES = (1, 2, 4, 8)


def request_mix(spec: profiler_pb2.RequestMixSpec) -> RequestMix:
    samples = list(zip(spec.prompt_tokens, spec.completion_tokens, strict=False))
    if len(spec.prompt_tokens) != len(spec.completion_tokens):
        raise InvalidInputError(
            f"mix.prompt_tokens/mix.completion_tokens: must have equal lengths, got "
            f"{len(spec.prompt_tokens)} and {len(spec.completion_tokens)}"
        )
    if samples:
        return RequestMix.from_samples(samples, id=spec.id or None)
    if spec.input_len < 1 or spec.output_len < 1:
        raise InvalidInputError(
            f"mix: give input_len and output_len >= 1, or samples; got input_len "
            f"{spec.input_len}, output_len {spec.output_len}"
        )
    mix = RequestMix.fixed(spec.input_len, spec.output_len)
    return RequestMix(spec.id, mix.samples) if spec.id else mix


class ProfilerServicer(profiler_pb2_grpc.ProfilerServicer):
    def __init__(
        self, store: Store, metrics: ProfilerMetrics, pool: ProfilePool | None = None
    ) -> None:
        self._store = store
        self._metrics = metrics
        self._pool = pool

    async def Profile(
        self,
        request: profiler_pb2.ProfileRequest,
        context: grpc.aio.ServicerContext[
            profiler_pb2.ProfileRequest, profiler_pb2.ProfileResponse
        ],
    ) -> profiler_pb2.ProfileResponse:
        backend = _backend(request.backend or "analytic")
        if request.HasField("model_spec"):
            model = model_from_pb(request.model_spec)
        else:
            model = resolve_model(request.model)
        gpu = gpu_spec(request.gpu_type)
        tp, fraction = _shape(request.tp or 1, request.fraction or 1.0)
        mix = request_mix(request.mix)
        key = ProfileKey(model.name, gpu.name, tp, fraction, backend.engine, mix.id)
        if not request.refresh:
            stored = await self._store.get_profile(key)
            if stored is not None:
                self._metrics.stored()
                return profiler_pb2.ProfileResponse(profile=profile_to_pb(stored), cached=True)
        started = time.perf_counter()
        profile: Profile
        if isinstance(backend, VllmBackend):
            # Measured: stored with each point's throughput and errors and how it was measured.
            measured = await asyncio.to_thread(
                backend.measure, model, gpu, tp, fraction, mix, request.seed
            )
            profile = measured.profile()
            self._metrics.computed(backend.engine, time.perf_counter() - started)
            await self._store.put_measured_profile(
                profile, measured.stored_points(), measured.method
            )
        elif self._pool is not None and isinstance(backend, AnalyticBackend):
            query = ProfileQuery(model.name, model, gpu, tp, fraction, mix, backend.name)
            made = await self._pool.run(compute_profile, backend, replace(query, seed=request.seed))
            if isinstance(made, str):
                raise InfeasibleError(made)
            profile = made
            self._metrics.computed(backend.engine, time.perf_counter() - started)
            await self._store.put_profile(profile)
        else:
            profile = await asyncio.to_thread(
                backend.profile, model, gpu, tp, fraction, mix, request.seed
            )
            self._metrics.computed(backend.engine, time.perf_counter() - started)
            await self._store.put_profile(profile)
        log.info(
            "profiled",
            model=model.name,
            gpu=gpu.name,
            tp=tp,
            fraction=fraction,
            mix=mix.id,
            saturation_rate=profile.saturation_rate,
        )
        return profiler_pb2.ProfileResponse(profile=profile_to_pb(profile), cached=False)

    async def GetProfile(
        self,
        request: profiler_pb2.GetProfileRequest,
        context: grpc.aio.ServicerContext[
            profiler_pb2.GetProfileRequest, profiler_pb2.ProfileResponse
        ],
    ) -> profiler_pb2.ProfileResponse:
        key = profile_key_from_pb(request.key)
        stored = await self._store.get_profile(key)
        if stored is None:
            raise NotFoundError(f"no stored profile for {key.redis_field()}")
        self._metrics.stored()
        return profiler_pb2.ProfileResponse(profile=profile_to_pb(stored), cached=True)


def _backend(name: str) -> ProfileBackend:
    if name not in BACKENDS:
        raise InvalidInputError(f"backend: must be one of {', '.join(BACKENDS)}, got {name!r}")
    return BACKENDS[name]


def _shape(tp: int, fraction: float) -> tuple[int, float]:
    if tp not in TP_DEGREES:
        raise InvalidInputError(f"tp: must be one of {TP_DEGREES}, got {tp}")
    if not 0 < fraction <= 1:
        raise InvalidInputError(f"fraction: must be in (0, 1], got {fraction:g}")
    if fraction < 1 and tp != 1:
        raise InvalidInputError(f"fraction: a fraction < 1 needs tp 1, got tp {tp}")
    return tp, fraction


def profiler_binding(
    store: Store, metrics: ProfilerMetrics | None = None, pool: ProfilePool | None = None
) -> ServiceBinding:
    """``metrics``: where profiles are counted (a fresh set by default); ``pool``: where
    analytic profiles are computed (None: a worker thread)."""
    metrics = metrics or ProfilerMetrics()
    servicer = ProfilerServicer(store, metrics, pool)
    return ServiceBinding(
        name=profiler_pb2.DESCRIPTOR.services_by_name["Profiler"].full_name,
        add_to_server=lambda server: profiler_pb2_grpc.add_ProfilerServicer_to_server(
            servicer, server
        ),
        metrics=(metrics.registry,),
    )
