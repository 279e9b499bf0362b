"""``python -m services.profiler``: run the profiler service until SIGTERM/SIGINT."""

from __future__ import annotations

from collections.abc import Sequence

from services.profiler.config import ProfilerConfig
from services.profiler.service import profiler_binding
from services.runtime.entry import run_service
from services.runtime.profile_pool import shared_pool
from services.runtime.server import ServiceBinding
from services.runtime.store import Store


async def build(config: ProfilerConfig, store: Store) -> Sequence[ServiceBinding]:
    return [profiler_binding(store, pool=shared_pool(config.profile_workers))]


def main(argv: Sequence[str] | None = None) -> int:
    return run_service(
        ProfilerConfig, build, argv, prog="python -m services.profiler", name="profiler"
    )


if __name__ == "__main__":
    raise SystemExit(main())
