"""``python -m services.placer``: run the placer until SIGTERM/SIGINT."""

from __future__ import annotations

from collections.abc import Sequence

from services.core.cluster.declared import load_cluster
from services.placer.config import PlacerConfig
from services.placer.service import Placer, placer_binding
from services.runtime.entry import run_service
from services.runtime.server import ServiceBinding
from services.runtime.store import Store


async def build(config: PlacerConfig, store: Store) -> Sequence[ServiceBinding]:
    declared = load_cluster(config.cluster) if config.cluster else None
    return [placer_binding(Placer(config, store, declared))]


def main(argv: Sequence[str] | None = None) -> int:
    return run_service(PlacerConfig, build, argv, prog="python -m services.placer", name="placer")


if __name__ == "__main__":
    raise SystemExit(main())
