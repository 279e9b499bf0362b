"""The baselines' allocations are what their definitions say (services/core/sim/baselines.py)."""

from __future__ import annotations

import pytest

from services.core.allocation import Allocation
from services.core.cluster.models import model_spec
from services.core.errors import InfeasibleError
from services.core.perf.profile import Profile, ProfileKey, ProfilePoint
from services.core.sim import baselines
from services.core.sim.control import ClusterView, ModelView, ReplicaView

BIG = model_spec("meta-llama/Llama-3.1-8B")
SMALL = model_spec("meta-llama/Llama-3.2-1B")
MID = model_spec("Qwen/Qwen3-4B")


def fits_all(model: str, tp: int, fraction: float) -> bool:
    return True


def needs_tp2(big: str) -> baselines.Fits:
    def fits(model: str, tp: int, fraction: float) -> bool:
        return tp >= 2 if model == big else True

    return fits


@pytest.mark.parametrize(
    ("models", "gpus", "fits", "expected"),
    [
        # 4 GPUs over 2 LLMs: 2 whole GPUs each, TP 1, so 2 replicas each
        ({"a": BIG, "b": SMALL}, 4, fits_all, {"a": (1, 2), "b": (1, 2)}),
        # 5 GPUs: 2 each, the remainder to the larger model (a: 8B) -> a 3 replicas
        ({"a": BIG, "b": SMALL}, 5, fits_all, {"a": (1, 3), "b": (1, 2)}),
        # 3 LLMs on 4 GPUs: 1 each + 1 for the largest (a)
        ({"a": BIG, "b": SMALL, "c": MID}, 4, fits_all, {"a": (1, 2), "b": (1, 1), "c": (1, 1)}),
        # a needs TP 2: its 3 GPUs hold one TP-2 replica (one GPU idle)
        ({"a": BIG, "b": SMALL}, 6, needs_tp2("a"), {"a": (2, 1), "b": (1, 3)}),
    ],
)
def test_even_split(
    models: dict[str, object], gpus: int, fits: baselines.Fits, expected: dict[str, tuple[int, int]]
) -> None:
    allocation = baselines.even_split(models, gpus, fits)  # type: ignore[arg-type]
    assert {m: (a.tp, a.replicas) for m, a in allocation.items()} == expected
    assert all(a.fraction == 1.0 for a in allocation.values())


def test_even_split_fails_when_a_share_is_below_the_least_tp() -> None:
    with pytest.raises(InfeasibleError, match="needs TP 2"):
        baselines.even_split({"a": BIG, "b": SMALL}, 2, needs_tp2("a"))


@pytest.mark.parametrize(
    ("demand", "minimum", "gpus", "expected"),
    [
        ({"a": 3.0, "b": 1.0}, {"a": 1, "b": 1}, 8, {"a": 6, "b": 2}),  # targets 6 and 2
        ({"a": 1.0, "b": 1.0}, {"a": 1, "b": 1}, 5, {"a": 3, "b": 2}),  # tie: by name
        ({"a": 9.0, "b": 1.0}, {"a": 1, "b": 4}, 8, {"a": 4, "b": 4}),  # b's minimum holds
    ],
)
def test_proportional_shares(
    demand: dict[str, float], minimum: dict[str, int], gpus: int, expected: dict[str, int]
) -> None:
    assert baselines.proportional_shares(demand, minimum, gpus) == expected


def profile(model: str, tp: int, saturation: float, latency: float) -> Profile:
    """A flat profile: ``latency`` per call at any rate up to 95% of ``saturation``."""
    key = ProfileKey(model, "H100-SXM", tp, 1.0, "test", "mix")
    points = tuple(
        ProfilePoint(saturation * f, latency, latency, latency, latency / 10, 0.01)
        for f in (0.1, 0.95)
    )
    return Profile(key, points, saturation)


def test_independent_sizes_by_demand_and_picks_each_llms_fastest_tp() -> None:
    # a: TP1 saturates at 10 calls/s, 1.0 s per call; TP2 at 16 calls/s, 0.6 s per call.
    # b: TP1 40 calls/s, 0.1 s; TP2 60 calls/s, 0.09 s.
    table = {
        ("a", 1): profile("a", 1, 10.0, 1.0),
        ("a", 2): profile("a", 2, 16.0, 0.6),
        ("b", 1): profile("b", 1, 40.0, 0.1),
        ("b", 2): profile("b", 2, 60.0, 0.09),
        ("a", 4): profile("a", 4, 20.0, 0.5),
        ("b", 4): profile("b", 4, 70.0, 0.085),
    }

    def profiles(model: str, tp: int, fraction: float) -> Profile:
        return table[(model, tp)]

    # loads: a 12 calls/s at 1/10 GPU-s each = 1.2; b 40 calls/s at 1/40 = 1.0 -> on 8 GPUs
    # targets 4.36 and 3.64 -> a 4, b 4 GPUs (largest deficit first: a, b, a, b, ...)
    allocation = baselines.independent({"a": 12.0, "b": 40.0}, profiles, fits_all, 8)
    # a on 4 GPUs: TP1 x4 (3 calls/s each, 1.0 s), TP2 x2 (6, 0.6 s), TP4 x1 (12, 0.5 s), all
    # below 95% of saturation -> TP4 is fastest; b: TP1 x4 (10, 0.1 s), TP2 x2 (20, 0.09 s),
    # TP4 x1 (40, 0.085 s) -> TP4
    assert allocation == {"a": Allocation(1.0, 4, 1), "b": Allocation(1.0, 4, 1)}


def view(now: float, outstanding: float, live: int) -> ClusterView:
    replicas = tuple(ReplicaView(str(i), 0, True) for i in range(live))
    model = ModelView("m", Allocation(1.0, 1, live), replicas, outstanding, 0)
    return ClusterView(now, 0.0, (model,))


@pytest.mark.parametrize(
    ("outstanding", "live", "expected"),
    [
        (10.0, 1, 1),  # ratio 10 / (1 x 10) = 1: within tolerance
        (10.5, 1, 1),  # ratio 1.05: within 10%
        (25.0, 1, 3),  # ceil(25 / 10)
        (30.0, 2, 3),  # ceil(30 / 10)
        (3.0, 4, 1),  # ceil(0.3), at least 1
    ],
)
def test_hpa_desired_replicas(outstanding: float, live: int, expected: int) -> None:
    hpa = baselines.HpaAutoscaler(target=10.0)
    assert hpa.desired(view(0.0, outstanding, live).models[0]) == expected


def test_hpa_scales_up_at_once_and_down_only_after_a_full_window() -> None:
    hpa = baselines.HpaAutoscaler(target=10.0, interval=15.0, scale_down_window=30.0)
    actions, state = hpa.decide(view(15.0, 45.0, 2), hpa.initial_state())
    assert [(a.model, a.delta) for a in actions] == [("m", 3)]  # ceil(4.5) = 5 wanted, 2 live
    # load drops: 1 replica wanted, but no window of recommendations yet
    actions, state = hpa.decide(view(30.0, 5.0, 5), state)
    assert actions == ()
    # at 45 the window (15..45] holds 1s and the 5 of t=15 -> no scale-down below 5 yet...
    actions, state = hpa.decide(view(45.0, 5.0, 5), state)
    assert actions == ()
    # ...at 60 the window (30, 60] holds only 1s: down to 1
    actions, state = hpa.decide(view(60.0, 5.0, 5), state)
    assert [(a.model, a.delta) for a in actions] == [("m", -4)]


def test_hpa_limits_a_scale_up_to_the_default_policy() -> None:
    # HPA's default: at most max(4, 100% of live) more per decision
    hpa = baselines.HpaAutoscaler(target=1.0)
    actions, _ = hpa.decide(view(15.0, 100.0, 2), hpa.initial_state())
    assert [(a.model, a.delta) for a in actions] == [("m", 4)]


def test_oracle_candidates_are_every_maximal_allocation() -> None:
    # 2 GPUs, k = 2 (4 units); configurations of one instance: 1 unit, 2 units (TP 1) or a TP-2
    # group (4 units). Maximal: no model could add one more replica in what is left.
    found = {
        tuple(sorted((m, round(a.fraction * 2), a.tp, a.replicas) for m, a in c.items()))
        for c in baselines.oracle_candidates(["a", "b"], 2, 2, fits_all, max_tp=2)
    }
    assert found == {
        (("a", 1, 1, 1), ("b", 1, 1, 3)),
        (("a", 1, 1, 2), ("b", 1, 1, 2)),
        (("a", 1, 1, 3), ("b", 1, 1, 1)),
        (("a", 2, 1, 1), ("b", 2, 1, 1)),
        (("a", 1, 1, 2), ("b", 2, 1, 1)),
        (("a", 2, 1, 1), ("b", 1, 1, 2)),
    }


def test_time_shares_in_whole_gpus_and_in_fractions() -> None:
    shares = {"a": 0.75, "b": 0.25}
    whole = baselines.time_shares(shares, 8, fits_all)
    assert whole == {"a": Allocation(1.0, 1, 6), "b": Allocation(1.0, 1, 2)}
    # "big" needs TP 2 and at least its 2 GPUs even with a small share
    tp2 = baselines.time_shares({"big": 0.1, "b": 0.9}, 8, needs_tp2("big"))
    assert tp2["big"] == Allocation(1.0, 2, 1) and tp2["b"] == Allocation(1.0, 1, 6)
    # quarters: "b" fits a quarter GPU, so 0.25 x 8 GPUs x 4 = 8 units = 8 replicas of 0.25
    frac = baselines.time_shares(shares, 8, fits_all, fraction_unit=4)
    assert frac == {"a": Allocation(0.25, 1, 24), "b": Allocation(0.25, 1, 8)}
    with pytest.raises(InfeasibleError):
        baselines.time_shares({"big": 0.5, "c": 0.5}, 2, needs_tp2("big"))
