"""The planner's own Prometheus figures: one set per process (``METRICS``), recorded with
``record_plan`` once a plan is made and stored; ``python -m services.planner`` adds its registry
to the server's, so ``GET /metrics`` of the planner process shows them beside the RPC counters.

| metric | type | |
|---|---|---|
| scepsy_planner_plans_total | counter | plans made, by ``stored``: new, or already (same id) |
| scepsy_planner_search_seconds | histogram | search and placement time of one plan |
| scepsy_planner_profile_seconds | histogram | of that, computing profiles |
| scepsy_planner_rounds | histogram | searches one plan took (placement feedback) |
| scepsy_planner_feedback_rounds_total | counter | searches beyond the first, summed |
| scepsy_planner_profiles_total | counter | profiles the plans used, by ``source`` |
| scepsy_planner_plan_gpus | gauge | GPUs the last plan allocates |
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from services.core.planning.plan import Plan

# Seconds; the exact search takes milliseconds to seconds, profiling can add minutes.
SEARCH_BUCKETS = (
    0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0,
)  # fmt: skip
ROUND_BUCKETS = (1, 2, 3, 4, 5, 8, 10, 20, 50, 100)


class PlannerMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.plans = Counter(
            "scepsy_planner_plans",
            "Plans made, by whether the plan was new or already stored under its id",
            ["stored"],
            registry=r,
        )
        self.search_seconds = Histogram(
            "scepsy_planner_search_seconds",
            "Search and placement time of one plan, profiles included",
            buckets=SEARCH_BUCKETS,
            registry=r,
        )
        self.profile_seconds = Histogram(
            "scepsy_planner_profile_seconds",
            "Time one plan spent computing profiles",
            buckets=SEARCH_BUCKETS,
            registry=r,
        )
        self.rounds = Histogram(
            "scepsy_planner_rounds",
            "Searches one plan took (1 + placement-feedback rounds)",
            buckets=ROUND_BUCKETS,
            registry=r,
        )
        self.feedback_rounds = Counter(
            "scepsy_planner_feedback_rounds",
            "Searches run again because the allocation did not place (placement feedback)",
            registry=r,
        )
        self.profiles = Counter(
            "scepsy_planner_profiles",
            "Profiles the plans used, by source (e.g. 'stored analytic-1', 'computed analytic-1')",
            ["source"],
            registry=r,
        )
        self.plan_gpus = Gauge(
            "scepsy_planner_plan_gpus", "GPUs the last plan allocates", registry=r
        )


METRICS = PlannerMetrics()


def record_plan(plan: Plan, new: bool, seconds: float, metrics: PlannerMetrics = METRICS) -> None:
    """Record one finished plan.

    ``plan``: the plan this call built (its ``rounds`` and profile sources are this call's; the
    stored copy of an already stored plan has those of the first call). ``new``: what
    ``Store.put_plan`` returned. ``seconds``: this call's search and placement time.
    """
    metrics.plans.labels("new" if new else "already").inc()
    metrics.search_seconds.observe(seconds)
    metrics.profile_seconds.observe(plan.profile_seconds)
    metrics.rounds.observe(plan.rounds)
    metrics.feedback_rounds.inc(max(0, plan.rounds - 1))
    for llm in plan.llms:
        for source, count in llm.profile_sources.items():
            metrics.profiles.labels(source).inc(count)
    metrics.plan_gpus.set(plan.gpus)
