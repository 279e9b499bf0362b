"""The planner's configuration."""

from __future__ import annotations

from dataclasses import dataclass

from services.core.control.decide import LoopConfig
from services.core.errors import ConfigError, InvalidInputError
from services.core.planning.feedback import DEFAULT_MAX_ROUNDS
from services.runtime.config import ServiceConfig, in_range, option, positive


@dataclass(frozen=True)
class PlannerConfig(ServiceConfig):
    """Planner: searches the allocation of a deployment spec, places it, stores it as a plan."""

    max_rounds: int = option(
        DEFAULT_MAX_ROUNDS,
        "placement feedback: searches before giving up on a placeable plan",
        in_range(1, 10_000),
    )
    profiler_address: str = option(
        "", "host:port of the Profiler service (empty: profiles computed in-process, store first)"
    )
    placer_address: str = option("", "host:port of the Placer service (empty: placed in-process)")
    trace_window_s: float = option(
        3600.0,
        "a spec's `trace: router` takes the router's calls of this many last seconds",
        positive,
    )
    refine_seconds: float = option(
        5.0,
        "refine the closed form's best plans by simulating them on a replay of the recorded "
        "trace, for at most this long (0: off; only specs whose workflows all use "
        "`trace: router`)",
        in_range(0, 3600),
    )
    refine_budget_calls: int = option(
        200_000,
        "refinement: LLM calls simulated per plan before no further candidate is scored "
        "(the same plan on any host as long as --refine-seconds does not cut it first)",
        in_range(1_000, 10**9),
    )
    refine_calls: int = option(
        20_000, "refinement: LLM calls per simulated candidate (at most)", in_range(1_000, 10**7)
    )
    profile_workers: int = option(
        0,
        "without a Profiler service: worker processes for cold profiles (0: one per CPU, "
        "1: none, computed by the search as it goes)",
        in_range(0, 256),
    )
    profile_calls: int = option(
        8,
        "with a Profiler service: Profile calls in flight at once while fetching a spec's "
        "profiles (1: one at a time, as the search asks)",
        in_range(1, 256),
    )
    rpc_timeout_s: float = option(
        30.0, "deadline of each call to the Profiler and Placer services", positive
    )
    # the control loop (services/planner/loop.py; thresholds: services/core/control/decide.py)
    loop: bool = option(True, "re-plan the current plan when load or nodes drift")
    loop_interval_s: float = option(5.0, "control loop: seconds between ticks", positive)
    loop_window_s: float = option(
        120.0, "control loop: statistics over the trace of this many last seconds", positive
    )
    loop_sustain_s: float = option(
        30.0, "control loop: a load drift must last this long to count", in_range(0, 86_400)
    )
    loop_min_interval_s: float = option(
        300.0, "control loop: no change sooner after the last (a lost node excepted)",
        in_range(0, 86_400),
    )  # fmt: skip
    loop_settle_s: float = option(
        60.0, "control loop: a new plan runs this long before its baseline window starts",
        in_range(0, 86_400),
    )  # fmt: skip
    loop_retry_s: float = option(
        60.0, "control loop: a failed re-plan is tried again after this long", in_range(0, 86_400)
    )
    loop_rate_up: float = option(
        1.5, "control loop: a rate above target x this (or the plan's headroom) drifts", positive
    )
    loop_rate_down: float = option(0.5, "control loop: a rate below target x this drifts", positive)
    loop_rate_noise: float = option(
        0.2, "control loop: a rate within target x (1 + this) never drifts", in_range(0, 100)
    )
    loop_share_delta: float = option(
        0.15, "control loop: an LLM's time share moving this much (absolute) drifts",
        in_range(0.001, 1),
    )  # fmt: skip
    loop_n_change: float = option(
        0.3, "control loop: calls per request changing this much (relative) drifts", positive
    )
    loop_tokens_change: float = option(
        0.5, "control loop: mean prompt or completion tokens changing this much drifts (0: off)",
        in_range(0, 1000),
    )  # fmt: skip
    loop_latency_objective_s: float = option(
        0.0, "control loop: mean end-to-end latency above this drifts (0: no objective)",
        in_range(0, 86_400),
    )  # fmt: skip
    loop_node_grace_s: float = option(
        15.0, "control loop: a node gone or new this long is lost or joined", in_range(0, 86_400)
    )
    loop_min_requests: int = option(
        20, "control loop: fewer requests in the window are too few to judge",
        in_range(1, 1_000_000),
    )  # fmt: skip
    loop_decisions_kept: int = option(
        1000, "control loop: decisions kept in Redis (newest)", in_range(1, 1_000_000)
    )

    def validate(self) -> None:
        super().validate()
        self.loop_config()

    def loop_config(self) -> LoopConfig:
        """The control loop's thresholds; ``ConfigError`` naming the field when they conflict."""
        try:
            return LoopConfig(
                window_s=self.loop_window_s,
                sustain_s=self.loop_sustain_s,
                min_interval_s=self.loop_min_interval_s,
                settle_s=self.loop_settle_s,
                retry_s=self.loop_retry_s,
                rate_up=self.loop_rate_up,
                rate_down=self.loop_rate_down,
                rate_noise=self.loop_rate_noise,
                share_delta=self.loop_share_delta,
                n_change=self.loop_n_change,
                tokens_change=self.loop_tokens_change,
                latency_objective_s=self.loop_latency_objective_s,
                node_grace_s=self.loop_node_grace_s,
                min_requests=self.loop_min_requests,
            )
        except InvalidInputError as exc:
            raise ConfigError(f"loop_{exc}") from None
