"""Routing policies: table-driven, expectations derived by hand in the comments."""

from __future__ import annotations

from collections import Counter

import pytest

from services.core.errors import InvalidInputError
from services.core.routing import (
    DEFAULT_POLICY,
    POLICIES,
    Affinity,
    CallInfo,
    CapacityWeighted,
    Endpoint,
    LeastOutstanding,
    PolicyOptions,
    PowerOfTwo,
    ReplicaLoad,
    RoutingPolicy,
    make_policy,
    policy_name,
    rendezvous_score,
)


def loads(*pairs: tuple[str, int]) -> list[ReplicaLoad]:
    return [ReplicaLoad(r, n) for r, n in pairs]


@pytest.mark.parametrize(
    ("replicas", "seq", "expected"),
    [
        # the only replica with the fewest outstanding calls wins, whatever seq is
        (loads(("a", 3), ("b", 1), ("c", 2)), 0, "b"),
        (loads(("a", 3), ("b", 1), ("c", 2)), 7, "b"),
        # ties among a and c (both 0), sorted by id -> [a, c]; seq 0 -> a, seq 1 -> c, seq 2 -> a
        (loads(("c", 0), ("b", 5), ("a", 0)), 0, "a"),
        (loads(("c", 0), ("b", 5), ("a", 0)), 1, "c"),
        (loads(("c", 0), ("b", 5), ("a", 0)), 2, "a"),
        (loads(("solo", 9)), 4, "solo"),
    ],
)
def test_least_outstanding(replicas: list[ReplicaLoad], seq: int, expected: str) -> None:
    assert LeastOutstanding().choose(replicas, CallInfo(seq)) == expected


def test_least_outstanding_alternates_idle_replicas() -> None:
    # sequential calls (nothing outstanding) must spread, not pile onto one replica
    idle = loads(("a", 0), ("b", 0))
    assert Counter(LeastOutstanding().choose(idle, CallInfo(s)) for s in range(10)) == {
        "a": 5,
        "b": 5,
    }


@pytest.mark.parametrize(
    ("replicas", "expected"),
    [
        # (outstanding + 1) / weight: a (0+1)/1 = 1, b (0+1)/3 = 0.33 -> b, the larger one
        ([ReplicaLoad("a", 0, 1.0), ReplicaLoad("b", 0, 3.0)], "b"),
        # a (0+1)/1 = 1, b (3+1)/3 = 1.33 -> a
        ([ReplicaLoad("a", 0, 1.0), ReplicaLoad("b", 3, 3.0)], "a"),
        # a (1+1)/1 = 2, b (4+1)/3 = 1.67 -> b: with 3x the capacity b takes ~3x the calls
        ([ReplicaLoad("a", 1, 1.0), ReplicaLoad("b", 4, 3.0)], "b"),
        # half a GPU with 0 calls, 1/0.5 = 2, vs a whole one with 1 call, 2/1 = 2: tie -> seq 0
        # picks the first by id, "half"
        ([ReplicaLoad("whole", 1, 1.0), ReplicaLoad("half", 0, 0.5)], "half"),
    ],
)
def test_capacity_weighted(replicas: list[ReplicaLoad], expected: str) -> None:
    assert CapacityWeighted().choose(replicas, CallInfo(0)) == expected


def test_capacity_weighted_splits_by_weight_under_load() -> None:
    # Closed loop: each call stays outstanding. After 40 calls to weights 3:1 the counts are
    # 30:10, since the policy keeps (n + 1) / w equal across replicas.
    counts = {"a": 0, "b": 0}
    weights = {"a": 3.0, "b": 1.0}
    for seq in range(40):
        chosen = CapacityWeighted().choose(
            [ReplicaLoad(r, counts[r], weights[r]) for r in counts], CallInfo(seq)
        )
        counts[chosen] += 1
    assert counts == {"a": 30, "b": 10}


@pytest.mark.parametrize("seed", [0, 1, 42])
def test_power_of_two_is_deterministic_and_picks_the_less_loaded_of_two(seed: int) -> None:
    replicas = loads(("a", 0), ("b", 10), ("c", 20), ("d", 30))
    policy = PowerOfTwo(seed=seed)
    picks = [policy.choose(replicas, CallInfo(s)) for s in range(200)]
    assert picks == [policy.choose(list(reversed(replicas)), CallInfo(s)) for s in range(200)]
    # The most loaded replica is never picked: it loses against any other sampled one.
    assert "d" not in picks
    # a wins whenever it is sampled: P(a in a random pair of 4) = 1/2.
    assert 70 <= picks.count("a") <= 130


def test_power_of_two_seeds_differ_and_single_replica() -> None:
    replicas = loads(("a", 0), ("b", 0), ("c", 0))
    runs = [[PowerOfTwo(seed).choose(replicas, CallInfo(s)) for s in range(50)] for seed in (1, 2)]
    assert runs[0] != runs[1]
    assert PowerOfTwo(3).choose(loads(("x", 5)), CallInfo(9)) == "x"


def _affinity_home(key: str, ids: list[str]) -> str:
    return max(ids, key=lambda r: rendezvous_score(key, r))


def test_affinity_keeps_a_request_on_one_replica_while_balanced() -> None:
    ids = ["r0", "r1", "r2"]
    for key in ("rag/1", "rag/2", "beam/77"):
        home = _affinity_home(key, ids)
        # loads 1, 1, 1: total 3, bound ceil(1.25 * 4 / 3) = 2; home has 1 + 1 <= 2 -> home
        assert Affinity().choose(loads(*[(r, 1) for r in ids]), CallInfo(0, key)) == home


@pytest.mark.parametrize(
    ("home_load", "others", "expect_home"),
    [
        # total 2 + 0 + 0 = 2, bound ceil(1.25 * 3 / 3) = 2; home 2 + 1 = 3 > 2 -> spill
        (2, 0, False),
        # total 1, bound ceil(1.25 * 2 / 3) = 1; home 1 + 1 = 2 > 1 -> spill
        (1, 0, False),
        # total 4 + 3 + 3 = 10, bound ceil(1.25 * 11 / 3) = 5; home 4 + 1 = 5 -> home
        (4, 3, True),
        # total 5 + 3 + 3 = 11, bound ceil(1.25 * 12 / 3) = 5; home 6 > 5 -> spill
        (5, 3, False),
    ],
)
def test_affinity_load_bound(home_load: int, others: int, expect_home: bool) -> None:
    ids = ["r0", "r1", "r2"]
    key = "wf/req"
    home = _affinity_home(key, ids)
    replicas = [ReplicaLoad(r, home_load if r == home else others) for r in ids]
    chosen = Affinity(load_factor=1.25).choose(replicas, CallInfo(0, key))
    assert (chosen == home) is expect_home
    if not expect_home:
        # the spill goes to the next replica in the key's ranking, which is within the bound
        ranked = sorted(ids, key=lambda r: rendezvous_score(key, r), reverse=True)
        assert chosen == ranked[1]


def test_affinity_without_key_is_least_outstanding() -> None:
    replicas = loads(("a", 2), ("b", 0), ("c", 1))
    assert Affinity().choose(replicas, CallInfo(5)) == "b"


def test_affinity_spreads_distinct_requests() -> None:
    ids = [f"r{i}" for i in range(4)]
    homes = Counter(
        Affinity().choose(loads(*[(r, 0) for r in ids]), CallInfo(0, f"wf/{n}")) for n in range(400)
    )
    assert set(homes) == set(ids)
    assert all(60 <= c <= 140 for c in homes.values())  # about 100 each


def test_affinity_rejects_factor_below_one() -> None:
    with pytest.raises(InvalidInputError, match="load_factor"):
        Affinity(load_factor=0.9)


@pytest.mark.parametrize("name", sorted(POLICIES))
def test_every_policy_returns_a_listed_replica_and_rejects_none(name: str) -> None:
    policy: RoutingPolicy = make_policy(name, PolicyOptions(seed=3))
    replicas = loads(("x", 2), ("y", 0), ("z", 1))
    for seq in range(20):
        assert policy.choose(replicas, CallInfo(seq, f"k{seq % 3}")) in {"x", "y", "z"}
    with pytest.raises(InvalidInputError, match="no replica"):
        policy.choose([], CallInfo(0))


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        # the registered, hyphenated names
        ("least-outstanding", LeastOutstanding()),
        ("power-of-two", PowerOfTwo(seed=9)),
        ("capacity-weighted", CapacityWeighted()),
        ("affinity", Affinity(load_factor=1.5)),
        # the underscore spelling of earlier configurations names the same policies
        ("least_outstanding", LeastOutstanding()),
        ("power_of_two", PowerOfTwo(seed=9)),
        ("capacity_weighted", CapacityWeighted()),
    ],
)
def test_make_policy_by_name_or_alias(name: str, expected: RoutingPolicy) -> None:
    assert make_policy(name, PolicyOptions(seed=9, load_factor=1.5)) == expected


def test_the_default_policy_is_registered() -> None:
    assert DEFAULT_POLICY == "least-outstanding" and policy_name(DEFAULT_POLICY) == DEFAULT_POLICY
    assert policy_name("power_of_two") == "power-of-two"


@pytest.mark.parametrize("name", ["random", "", "least outstanding", "Affinity", "power-of_two"])
def test_an_unknown_policy_names_the_choices(name: str) -> None:
    choices = "affinity, capacity-weighted, least-outstanding, power-of-two"
    with pytest.raises(InvalidInputError, match=f"routing policy: unknown .*{choices}"):
        make_policy(name)


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"model": ""}, "model"),
        ({"replica": ""}, "replica"),
        ({"url": "10.0.0.1:8000"}, "url"),
        ({"weight": 0.0}, "weight"),
        ({"weight": float("nan")}, "weight"),
    ],
)
def test_endpoint_validation(kwargs: dict[str, object], field: str) -> None:
    base: dict[str, object] = {"model": "m", "replica": "r", "url": "http://h:1", "weight": 1.0}
    with pytest.raises(InvalidInputError, match=field):
        Endpoint(**{**base, **kwargs})  # type: ignore[arg-type]
