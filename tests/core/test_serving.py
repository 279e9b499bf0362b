"""The engines a plan asks for: stable content ids, rollouts, and when a new engine fits."""

from __future__ import annotations

import dataclasses

from services.core.placement.rules import make_assignment
from services.core.serving import (
    EngineIntent,
    Occupant,
    blockers,
    engine_id,
    fits,
    rollout,
)
from services.core.workload.spec import ModelServing

K = 4
SERVE = ModelServing("gen", "/w/gen", "gen", 256, ())


def intent(
    model: str, replica: int, gpus: tuple[int, ...], units: int, node: str = "n"
) -> EngineIntent:
    a = make_assignment(model, replica, node, gpus, units, K, 0.05)
    serving = dataclasses.replace(SERVE, model=model, served_name=model)
    return EngineIntent(engine_id(serving, a), serving, a, K, "H100-SXM")


def occupant(e: EngineIntent) -> Occupant:
    return Occupant(e.id, e.model, e.replica, e.assignment)


def test_ids_cover_how_an_engine_runs_and_not_its_replica_number() -> None:
    a = intent("gen", 0, (0,), 4)
    assert a.id == intent("gen", 0, (0,), 4).id  # same plan, same id
    assert a.id == intent("gen", 3, (0,), 4).id  # renumbered, still the same engine
    assert a.id != intent("gen", 0, (1,), 4).id  # other GPU
    assert a.id != intent("gen", 0, (0,), 2).id  # other share
    assert a.id != intent("gen", 0, (0,), 4, node="m").id  # other node
    longer = dataclasses.replace(a.serving, max_model_len=512)
    assert engine_id(longer, a.assignment) != a.id  # serves differently
    assert engine_id(SERVE, a.assignment, 1) == f"{a.id}-1"  # the second of two alike
    assert a.weight == 1.0 and intent("gen", 0, (0, 1), 4).weight == 2.0


def test_rollout_keeps_starts_stops_and_pairs_moves() -> None:
    running = [intent("gen", 0, (0,), 4), intent("rr", 0, (1,), 4), intent("rr", 1, (2,), 4)]
    wanted = [running[0], intent("gen", 1, (1,), 4), intent("rr", 0, (2,), 4)]
    change = rollout(wanted, [occupant(e) for e in running])
    # rr#1 on GPU 2 is the new rr#0 on GPU 2: the same engine, kept
    assert {e.id for e in change.kept} == {running[0].id, running[2].id}
    assert [e.id for e in change.started] == [wanted[1].id]
    assert [o.id for o in change.stopped] == [running[1].id]
    assert change.moved == () and change.changes
    again = rollout(wanted, [occupant(e) for e in wanted])
    assert not again.changes and len(again.kept) == 3
    moved = rollout([intent("rr", 0, (3,), 4)], [occupant(intent("rr", 0, (1,), 4))])
    assert [(o.replica, n.replica) for o, n in moved.moved] == [(0, 0)]


def test_a_new_engine_fits_beside_others_only_within_units_and_memory() -> None:
    half = intent("a", 0, (0,), 2)
    other_half = intent("b", 0, (0,), 2)
    whole = intent("c", 0, (0,), 4)
    elsewhere = intent("d", 0, (1,), 4)
    assert fits(half, [occupant(other_half), occupant(elsewhere)])
    assert blockers(whole, [occupant(half), occupant(elsewhere)]) == (occupant(half),)
    assert not fits(intent("e", 0, (0, 1), 4), [occupant(elsewhere)])
    assert fits(whole, [occupant(intent("c", 0, (0,), 4, node="m"))])  # other node
    assert fits(whole, [occupant(whole)])  # itself does not count
