"""Cold profiles computed in worker processes: by the planner's prefetch, by the Profiler
service for concurrent calls, and fetched from the Profiler with calls in flight at once. The
profiles are the ones a single process computes, bit for bit."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from services.core.errors import InfeasibleError
from services.core.perf.backends import AnalyticBackend, clear_cache
from services.core.perf.profile import Profile
from services.core.planning.plan import PlanInputs, make_plan, spec_from_text
from services.core.planning.profiles import (
    PARALLEL_MIN_COLD,
    SpecProfiles,
    StoreFirst,
    compute_profile,
    spec_configs,
)
from services.planner.clients import ProfilerClient
from services.planner.config import PlannerConfig
from services.planner.service import Planner
from services.profiler.config import ProfilerConfig
from services.profiler.service import profiler_binding
from services.runtime.profile_pool import (
    ProfilePool,
    pool_workers,
    prefetch_cold,
    prefetch_remote,
    quota_cpus,
    shared_pool,
)
from services.runtime.server import Server
from services.runtime.store import Store

# two models, quarter GPUs on 2 GPUs: 5 configurations each (4 fractions and TP 2), and a 14B
# model that fits on neither a quarter nor a half of an H100 (profiled as infeasible)
SPEC = """
version: 1
fraction_unit: 4
cluster: {gpu_type: H100-SXM, gpus: 2}
models:
  A: Qwen/Qwen2.5-0.5B
  B: Qwen/Qwen2.5-1.5B
  C: Qwen/Qwen2.5-14B-Instruct
workflows:
  - name: w
    rate: 1.0
    stats:
      stages: [[A], [B], [C]]
      llms:
        A: {n: 1, prompt_tokens: 310, completion_tokens: 41}
        B: {n: 1, prompt_tokens: 520, completion_tokens: 63}
        C: {n: 1, prompt_tokens: 200, completion_tokens: 20}
"""

Expected = dict[tuple[str, int, float], Profile | str]


def _pid(_: object) -> int:
    return os.getpid()


@pytest.fixture
def pool() -> Iterator[ProfilePool]:
    p = ProfilePool(2)
    yield p
    p.close()


def serial_profiles(spec_text: str) -> Expected:
    """Every configuration's profile computed here, one at a time, without the memory."""
    spec = spec_from_text(spec_text)
    reference = SpecProfiles(spec, StoreFirst({"analytic": AnalyticBackend(cache=False)}))
    out: Expected = {}
    for config in spec_configs(spec):
        try:
            out[config] = reference.profile(*config)
        except InfeasibleError as exc:
            out[config] = str(exc)
    return out


def check(profiles: SpecProfiles, expected: Expected) -> None:
    for config, want in expected.items():
        if isinstance(want, str):
            with pytest.raises(InfeasibleError):
                profiles.profile(*config)
        else:
            assert profiles.profile(*config) == want, config


def test_workers_per_setting(tmp_path: Path) -> None:
    assert pool_workers(1) == 0 and pool_workers(3) == 3
    cpus = min(len(os.sched_getaffinity(0)), quota_cpus() or 16, 16)
    assert pool_workers(0) == (cpus if cpus > 1 else 0)
    # a container's CPU limit (cgroup v2 cpu.max): 1.5 CPUs is 2 workers
    limit = tmp_path / "cpu.max"
    for text, want in (("150000 100000\n", 2), ("max 100000\n", None), ("50000 100000", 1)):
        limit.write_text(text)
        assert quota_cpus(str(limit)) == want
    assert quota_cpus(str(tmp_path / "absent")) is None
    with pytest.raises(ValueError, match="workers"):
        ProfilePool(1)


def test_cold_profiles_from_worker_processes_equal_the_serial_ones(pool: ProfilePool) -> None:
    expected = serial_profiles(SPEC)
    assert any(isinstance(v, str) for v in expected.values())  # C at a quarter does not fit
    clear_cache()
    spec = spec_from_text(SPEC)
    profiles = SpecProfiles(spec)
    assert len(profiles.cold(spec_configs(spec))) == 15 >= PARALLEL_MIN_COLD
    assert prefetch_cold(profiles, pool) == 15
    assert os.getpid() not in set(pool.map(_pid, range(8)))  # the pool is other processes
    assert profiles.cold(spec_configs(spec)) == []
    check(profiles, expected)
    # a warm spec sends nothing to the pool
    assert prefetch_cold(SpecProfiles(spec), pool) == 0


def test_few_cold_profiles_stay_in_process(pool: ProfilePool) -> None:
    clear_cache()
    spec = spec_from_text(SPEC)
    profiles = SpecProfiles(spec)
    for config in spec_configs(spec)[: 15 - PARALLEL_MIN_COLD + 1]:
        with contextlib.suppress(InfeasibleError):
            profiles.profile(*config)
    assert len(profiles.cold(spec_configs(spec))) < PARALLEL_MIN_COLD
    assert prefetch_cold(profiles, pool) == 0


async def test_the_profiler_computes_in_its_pool_what_the_planner_fetches_at_once(
    redis_url: str, namespace: str, store: Store, pool: ProfilePool
) -> None:
    expected = serial_profiles(SPEC)
    clear_cache()
    config = ProfilerConfig(redis_url=redis_url, namespace=namespace, drain_s=0.0, grace_s=1.0)
    server = Server(config, [profiler_binding(store, pool=pool)])
    await server.start()
    client = ProfilerClient(server.address, 30.0)
    try:
        spec = spec_from_text(SPEC)
        profiles = SpecProfiles(spec, client)
        fetched = await asyncio.to_thread(prefetch_remote, profiles, 6)
        assert fetched == len(expected) == 15
        check(profiles, expected)
        # what the Profiler computed it stored under the profile's key
        for (name, tp, fraction), want in expected.items():
            stored = await store.get_profile(
                profiles.query(name, tp, fraction).key(AnalyticBackend.engine)
            )
            assert stored == (None if isinstance(want, str) else want)
        # an infeasible one comes back as FAILED_PRECONDITION (InfeasibleError) saying why, as
        # the pool's worker said it
        with pytest.raises(InfeasibleError) as err:
            await asyncio.to_thread(client.fetch, profiles.query("C", 1, 0.25))
        assert str(expected[("C", 1, 0.25)]) in str(err.value)
    finally:
        client.close()
        await server.stop()


async def test_a_planner_without_a_profiler_plans_the_same_with_its_pool(
    redis_url: str, namespace: str, store: Store
) -> None:
    cluster = "version: 1\nnodes:\n  - {name: box, gpu_type: H100-SXM, gpus: 2}\n"
    clear_cache()
    spec = spec_from_text(SPEC)
    serial = make_plan(PlanInputs(SPEC, spec, spec.nodes, SpecProfiles(spec)))
    clear_cache()
    config = PlannerConfig(
        redis_url=redis_url, namespace=namespace, loop=False, refine_seconds=0, profile_workers=2
    )
    pool = shared_pool(2)
    assert pool is not None
    pool.close()  # not started: what follows starts it
    planner = Planner(config, store)
    plan = await planner.plan(SPEC, cluster)
    assert pool.started
    assert plan.allocation == serial.allocation
    assert plan.objective_s == serial.objective_s and plan.workflows == serial.workflows
    # every profile was computed (in the pool: nothing is left cold in this process)
    assert SpecProfiles(spec).cold(spec_configs(spec)) == []


def test_a_pool_whose_worker_died_is_replaced_and_the_work_still_done(pool: ProfilePool) -> None:
    expected = serial_profiles(SPEC)
    victims = set(pool.map(_pid, range(8)))
    for pid in victims:  # a worker killed (the OOM killer, an operator): the pool is broken
        os.kill(pid, signal.SIGKILL)
    time.sleep(0.5)
    clear_cache()
    spec = spec_from_text(SPEC)
    profiles = SpecProfiles(spec)
    assert prefetch_cold(profiles, pool) == 0  # nothing from the broken pool ...
    assert not pool.started  # ... which was dropped
    check(profiles, expected)  # the search computes them here
    assert not victims & set(pool.map(_pid, range(8)))  # the next use starts new workers


async def test_a_broken_pool_runs_the_call_here(pool: ProfilePool) -> None:
    spec = spec_from_text(SPEC)
    query = SpecProfiles(spec).query("A", 1, 0.5)
    backend = AnalyticBackend(cache=False)
    first = await pool.run(compute_profile, backend, query)
    for pid in set(pool.map(_pid, range(8))):
        os.kill(pid, signal.SIGKILL)
    await asyncio.sleep(0.5)
    assert await pool.run(compute_profile, backend, query) == first
    assert not pool.started  # dropped; the next call starts a new one
    assert await pool.run(compute_profile, backend, query) == first and pool.started
