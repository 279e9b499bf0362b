"""SpecProfiles: a cold prefetch computes each distinct profile once."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from services.core.perf.backends import clear_cache
from services.core.planning.plan import spec_from_text
from services.core.planning.profiles import ProfileQuery, SpecProfiles, spec_configs

# A and A2 are the same model with the same calls: their profiles are the same ones
SPEC = """
version: 1
fraction_unit: 2
cluster: {gpu_type: H100-SXM, gpus: 2}
models:
  A: Qwen/Qwen2.5-0.5B
  A2: Qwen/Qwen2.5-0.5B
  B: Qwen/Qwen2.5-1.5B
workflows:
  - name: w
    rate: 1.0
    stats:
      stages: [[A], [A2], [B]]
      llms:
        A: {n: 1, prompt_tokens: 300, completion_tokens: 40}
        A2: {n: 1, prompt_tokens: 300, completion_tokens: 40}
        B: {n: 1, prompt_tokens: 500, completion_tokens: 60}
"""


def test_a_prefetch_computes_each_shared_profile_once() -> None:
    spec = spec_from_text(SPEC)
    configs = spec_configs(spec)  # A, A2 and B: tp 1 x 0.5, tp 1 x 1, tp 2 each
    assert len(configs) == 9
    clear_cache()
    mapped: list[ProfileQuery] = []

    def mapper(
        function: Callable[[ProfileQuery], Any], queries: list[ProfileQuery]
    ) -> Iterable[Any]:
        mapped.extend(queries)
        return map(function, queries)

    profiles = SpecProfiles(spec)
    assert profiles.query("A", 1, 1.0).mix == profiles.query("A2", 1, 1.0).mix
    profiles.prefetch(configs, mapper)
    assert sorted((q.name, q.tp, q.fraction) for q in mapped) == [
        ("A", 1, 0.5), ("A", 1, 1.0), ("A", 2, 1.0), ("B", 1, 0.5), ("B", 1, 1.0), ("B", 2, 1.0)
    ]  # fmt: skip
    assert profiles.profile("A2", 2, 1.0) == profiles.profile("A", 2, 1.0)
    assert profiles.cold(configs) == []
