"""What a workflow asks of its LLMs per request (n_m, p_m, stages, tool time): the ALP's input.

Built from trace statistics (``WorkflowDemand.from_stats``) or written inline in a spec.
"""

from __future__ import annotations

from dataclasses import dataclass

from services.core.errors import InvalidInputError
from services.core.workload.stats import WorkflowStats


@dataclass(frozen=True, slots=True)
class LlmDemand:
    """What one workflow asks of one LLM per request: n calls, concurrency p."""

    model: str
    n: float
    p: float


@dataclass(frozen=True, slots=True)
class WorkflowDemand:
    """The ALP's view of one workflow. ``stages`` partitions the models, in execution order."""

    name: str
    llms: tuple[LlmDemand, ...]
    tool_time: float = 0.0
    stages: tuple[tuple[str, ...], ...] = ()

    def __post_init__(self) -> None:
        models = [d.model for d in self.llms]
        if len(set(models)) != len(models):
            raise InvalidInputError(f"workflow {self.name}: llms: a model is listed twice")
        for d in self.llms:
            if not d.n > 0:
                raise InvalidInputError(
                    f"workflow {self.name}: {d.model}.n: must be > 0, got {d.n}"
                )
            if not d.p >= 1:
                raise InvalidInputError(
                    f"workflow {self.name}: {d.model}.p: must be >= 1, got {d.p}"
                )
        if not self.tool_time >= 0:
            raise InvalidInputError(
                f"workflow {self.name}: tool_time: must be >= 0, got {self.tool_time}"
            )
        staged = [m for stage in self.stages for m in stage]
        if self.stages and sorted(staged) != sorted(models):
            raise InvalidInputError(
                f"workflow {self.name}: stages: must partition the models {sorted(models)}, "
                f"got {[list(s) for s in self.stages]}"
            )
        if not self.stages:
            # No observed concurrency structure: the paper's serial composition.
            object.__setattr__(self, "stages", tuple((m,) for m in models))

    @classmethod
    def from_stats(cls, stats: WorkflowStats) -> WorkflowDemand:
        """Demand from trace statistics; LLMs with no successful call are left out."""
        llms = tuple(LlmDemand(m.model, m.n, m.p) for m in stats.llms if m.n > 0)
        kept = {d.model for d in llms}
        stages = tuple(
            kept_stage
            for stage in stats.stages
            if (kept_stage := tuple(m for m in stage if m in kept))
        )
        return cls(stats.workflow, llms, stats.tool_time_mean, stages)
