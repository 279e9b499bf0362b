"""An allocation: one LLM's GPU fraction, tensor-parallel degree and replica count.

The shared type of the planning half: the search produces allocations, the ALP scores them, the
placer places them and the simulator runs them. It lives apart from all of them so that each can
use it without importing another.
"""

from __future__ import annotations

from dataclasses import dataclass

from services.core.errors import InvalidInputError

TP_DEGREES: tuple[int, ...] = (1, 2, 4, 8)
# the most instances one LLM can have: the largest cluster a file may declare (16,384 GPUs,
# services/core/cluster/declared.py) in eighths; more is a typo or a hostile file, not a plan
MAX_REPLICAS = 16384 * 8


@dataclass(frozen=True, slots=True)
class Allocation:
    """One LLM's share of the cluster: ``replicas`` instances, each on ``tp`` GPUs x ``fraction``.

    ``0 < fraction <= 1``; a fraction below 1 only with ``tp == 1``. That the fraction is a
    multiple of 1/k is checked by ``check_fraction_unit`` (k belongs to the deployment).
    """

    fraction: float
    tp: int
    replicas: int

    def __post_init__(self) -> None:
        if self.tp not in TP_DEGREES:
            raise InvalidInputError(f"tp: must be one of {TP_DEGREES}, got {self.tp!r}")
        if isinstance(self.replicas, bool) or not isinstance(self.replicas, int):
            raise InvalidInputError(f"replicas: must be an integer, got {self.replicas!r}")
        if self.replicas < 1:
            raise InvalidInputError(f"replicas: must be >= 1, got {self.replicas}")
        if self.replicas > MAX_REPLICAS:
            raise InvalidInputError(
                f"replicas: must be at most {MAX_REPLICAS}, got {self.replicas}"
            )
        if not 0 < self.fraction <= 1:
            raise InvalidInputError(f"fraction: must be in (0, 1], got {self.fraction!r}")
        if self.fraction < 1 and self.tp != 1:
            raise InvalidInputError(
                f"fraction: a fraction below 1 ({self.fraction:g}) needs tp 1, got tp {self.tp}"
            )

    @property
    def gpus(self) -> float:
        """GPUs used: replicas x tp x fraction."""
        return self.replicas * self.tp * self.fraction


def check_fraction_unit(model: str, allocation: Allocation, k: int) -> None:
    """Raise ``InvalidInputError`` unless ``allocation.fraction`` is a multiple of 1/k."""
    units = allocation.fraction * k
    if abs(units - round(units)) > 1e-9:
        raise InvalidInputError(
            f"{model}.fraction: must be a multiple of 1/{k}, got {allocation.fraction:g}"
        )
