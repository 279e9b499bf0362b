"""Routing policies: which replica of a model serves the next call.

Pure decisions over explicit inputs, so that the router, the simulator and tests drive exactly the
same code. A policy sees a snapshot of the replicas that may take the call (healthy, below their
in-flight limit, not excluded by a retry) and the call's facts, and returns one replica id:

* ``ReplicaLoad`` - a replica id, its outstanding calls and its capacity weight (GPU share);
* ``CallInfo`` - the caller's call sequence number (tie-breaks and seeded randomness derive from
  it, so a decision is a function of its inputs) and an optional affinity key (the workflow
  request the call belongs to).

Policies are frozen dataclasses behind the ``RoutingPolicy`` protocol, made by name from
``POLICIES`` (the name used in configuration, hyphenated; ``ALIASES`` keeps the underscore
spelling of earlier configurations, ``least_outstanding``, working). Every policy ignores the
input order of replicas (it sorts by id), raises ``InvalidInputError`` on an empty replica list,
and always returns an id from the list.

* ``least-outstanding`` (default): fewest outstanding calls; ties rotate with ``seq``.
* ``power-of-two``: two distinct replicas drawn by a seeded hash of ``seq``; the less loaded.
* ``capacity-weighted``: lowest (outstanding + 1) / weight, the load per unit of capacity a
  replica would have after taking the call; ties rotate with ``seq``.
* ``affinity``: replicas ranked by rendezvous hash of the affinity key; the first whose load
  stays within ``ceil(load_factor * (total + 1) / n)``; calls without a key: least outstanding.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

from services.core.errors import InvalidInputError

DEFAULT_POLICY = "least-outstanding"
DEFAULT_LOAD_FACTOR = 1.25
_MASK64 = (1 << 64) - 1


@dataclass(frozen=True, slots=True)
class Endpoint:
    """One engine replica of a model, as registered in the shared store.

    ``replica`` is unique within the model; ``url`` is the engine's base URL (``http://host:port``,
    without ``/v1``); ``weight`` is its capacity (e.g. its GPU share), > 0.
    """

    model: str
    replica: str
    url: str
    weight: float = 1.0

    def __post_init__(self) -> None:
        if not self.model:
            raise InvalidInputError("endpoint model: must not be empty")
        if not self.replica:
            raise InvalidInputError(f"endpoint replica of {self.model}: must not be empty")
        if not self.url.startswith(("http://", "https://")):
            raise InvalidInputError(
                f"endpoint url of {self.model}/{self.replica}: must start with http:// or "
                f"https://, got {self.url!r}"
            )
        if not (self.weight > 0 and math.isfinite(self.weight)):
            raise InvalidInputError(
                f"endpoint weight of {self.model}/{self.replica}: must be > 0, got {self.weight}"
            )


@dataclass(frozen=True, slots=True)
class ReplicaLoad:
    """A replica that may take the call: its id, outstanding calls (>= 0) and weight (> 0)."""

    replica: str
    outstanding: int
    weight: float = 1.0


@dataclass(frozen=True, slots=True)
class CallInfo:
    """What a policy knows of the call: the caller's sequence number and an affinity key."""

    seq: int
    affinity: str | None = None


class RoutingPolicy(Protocol):
    """Chooses one replica id from a non-empty list of candidates."""

    def choose(self, replicas: Sequence[ReplicaLoad], call: CallInfo) -> str: ...


def _sorted(replicas: Sequence[ReplicaLoad]) -> list[ReplicaLoad]:
    if not replicas:
        raise InvalidInputError("routing: no replica to choose from")
    return sorted(replicas, key=lambda r: r.replica)


def _rotate(tied: Sequence[ReplicaLoad], seq: int) -> str:
    """One of several equally good replicas (already sorted), taking turns as ``seq`` grows."""
    return tied[seq % len(tied)].replica


def splitmix64(x: int) -> int:
    """A 64-bit mixing function: well-spread pseudo-random output for consecutive inputs."""
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def rendezvous_score(key: str, replica: str) -> int:
    """Highest-random-weight score of ``replica`` for ``key`` (stable across processes)."""
    digest = hashlib.blake2b(f"{key}\x00{replica}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big")


@dataclass(frozen=True, slots=True)
class LeastOutstanding:
    """Fewest outstanding calls; equally loaded replicas take turns."""

    def choose(self, replicas: Sequence[ReplicaLoad], call: CallInfo) -> str:
        ordered = _sorted(replicas)
        least = min(r.outstanding for r in ordered)
        return _rotate([r for r in ordered if r.outstanding == least], call.seq)


@dataclass(frozen=True, slots=True)
class PowerOfTwo:
    """Two distinct replicas sampled by ``splitmix64(seed, seq)``; the less loaded one wins,
    the first sampled on a tie. One replica is chosen outright."""

    seed: int = 0

    def choose(self, replicas: Sequence[ReplicaLoad], call: CallInfo) -> str:
        ordered = _sorted(replicas)
        n = len(ordered)
        if n == 1:
            return ordered[0].replica
        draw = splitmix64(splitmix64(self.seed & _MASK64) ^ (call.seq & _MASK64))
        first = draw % n
        second = (first + 1 + (draw >> 32) % (n - 1)) % n  # any index but ``first``
        a, b = ordered[first], ordered[second]
        return b.replica if b.outstanding < a.outstanding else a.replica


@dataclass(frozen=True, slots=True)
class CapacityWeighted:
    """Lowest (outstanding + 1) / weight: under load each replica's queue stays proportional to
    its capacity, so calls split by GPU share; an idle system prefers the largest replica."""

    def choose(self, replicas: Sequence[ReplicaLoad], call: CallInfo) -> str:
        ordered = _sorted(replicas)
        scores = [(r.outstanding + 1) / r.weight for r in ordered]
        best = min(scores)
        tied = [r for r, s in zip(ordered, scores, strict=True) if math.isclose(s, best)]
        return _rotate(tied, call.seq)


@dataclass(frozen=True, slots=True)
class Affinity:
    """Calls sharing an affinity key prefer the same replica (prefix-cache reuse) while no
    replica's load exceeds ``ceil(load_factor * (total outstanding + 1) / n)`` after taking it
    (consistent hashing with bounded loads). A least loaded replica always fits that bound, so a
    replica is always found. Calls without a key are routed by least outstanding."""

    load_factor: float = DEFAULT_LOAD_FACTOR

    def __post_init__(self) -> None:
        if not self.load_factor >= 1.0:
            raise InvalidInputError(f"affinity load_factor: must be >= 1, got {self.load_factor}")

    def choose(self, replicas: Sequence[ReplicaLoad], call: CallInfo) -> str:
        ordered = _sorted(replicas)
        if call.affinity is None:
            return LeastOutstanding().choose(ordered, call)
        total = sum(r.outstanding for r in ordered)
        bound = math.ceil(self.load_factor * (total + 1) / len(ordered))
        key = call.affinity
        ranked = sorted(ordered, key=lambda r: rendezvous_score(key, r.replica), reverse=True)
        for replica in ranked:
            if replica.outstanding + 1 <= bound:
                return replica.replica
        return LeastOutstanding().choose(ordered, call)  # unreachable for load_factor >= 1


@dataclass(frozen=True, slots=True)
class PolicyOptions:
    """Parameters the policies take: the seed of ``power-of-two``, the bound of ``affinity``."""

    seed: int = 0
    load_factor: float = DEFAULT_LOAD_FACTOR


POLICIES: Mapping[str, Callable[[PolicyOptions], RoutingPolicy]] = {
    "least-outstanding": lambda o: LeastOutstanding(),
    "power-of-two": lambda o: PowerOfTwo(seed=o.seed),
    "capacity-weighted": lambda o: CapacityWeighted(),
    "affinity": lambda o: Affinity(load_factor=o.load_factor),
}
# the underscore spelling, once the only one, still names the same policy
ALIASES: Mapping[str, str] = {name.replace("-", "_"): name for name in POLICIES if "-" in name}


def policy_name(name: str) -> str:
    """The registered name of policy ``name`` (an alias resolved); ``InvalidInputError`` naming
    the choices if there is none."""
    canonical = ALIASES.get(name, name)
    if canonical not in POLICIES:
        raise InvalidInputError(
            f"routing policy: unknown {name!r} (choose one of {', '.join(sorted(POLICIES))})"
        )
    return canonical


def make_policy(name: str, options: PolicyOptions | None = None) -> RoutingPolicy:
    """The policy registered under ``name`` or its alias; ``InvalidInputError`` naming the
    choices if none."""
    return POLICIES[policy_name(name)](options or PolicyOptions())
