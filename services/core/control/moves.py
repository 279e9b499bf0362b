"""What changing from one placement to another does to the running engines.

An engine is one (model, replica) of a placement. Between the old and the new placement it is
**kept** (same node, GPUs and share), **moved** (same model, replica and configuration, other
node or GPUs: the placer carries the replica id along a move), **resized** (same replica id, other
TP degree or share: a new engine replaces it), **started** (only in the new placement) or
**stopped** (only in the old one). Only what is not kept is listed; ``kept`` counts the rest.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

from services.core.placement.rules import Assignment

Action = Literal["move", "resize", "start", "stop"]


@dataclass(frozen=True, slots=True)
class Move:
    action: Action
    model: str
    replica: int
    before: str  # "node:gpu,gpu@units/k", "" when started
    after: str  # same, "" when stopped


@dataclass(frozen=True, slots=True)
class Moves:
    kept: int
    moves: tuple[Move, ...]  # sorted by (model, replica)

    def count(self, action: Action) -> int:
        return sum(m.action == action for m in self.moves)


def where(a: Assignment, k: int) -> str:
    gpus = ",".join(str(g) for g in a.gpus)
    return f"{a.node}:{gpus}@{a.units}/{k}"


def diff(old: Sequence[Assignment], new: Sequence[Assignment], k: int) -> Moves:
    """The moves that turn placement ``old`` into ``new`` (module docstring); ``k`` is the
    fraction unit, for display."""
    before = {(a.model, a.replica): a for a in old}
    after = {(a.model, a.replica): a for a in new}
    kept = 0
    moves: list[Move] = []
    for key in sorted(before.keys() | after.keys()):
        a, b = before.get(key), after.get(key)
        if a is None and b is not None:
            moves.append(Move("start", b.model, b.replica, "", where(b, k)))
        elif b is None and a is not None:
            moves.append(Move("stop", a.model, a.replica, where(a, k), ""))
        elif a is not None and b is not None:
            if (a.tp, a.units) != (b.tp, b.units):
                moves.append(Move("resize", a.model, a.replica, where(a, k), where(b, k)))
            elif (a.node, a.gpus) != (b.node, b.gpus):
                moves.append(Move("move", a.model, a.replica, where(a, k), where(b, k)))
            else:
                kept += 1
    return Moves(kept, tuple(moves))


def moves_dict(moves: Moves) -> dict[str, Any]:
    return {
        "kept": moves.kept,
        "moves": [
            {
                "action": m.action,
                "model": m.model,
                "replica": m.replica,
                "before": m.before,
                "after": m.after,
            }
            for m in moves.moves
        ],
    }
