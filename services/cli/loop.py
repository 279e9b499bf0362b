"""``scepsy loop status|pause|resume|pin PLAN_ID|unpin|decisions``: the planner's control loop.

* ``status``: the operator's settings, the loop's view at its last tick (statistics per
  workflow over its window, current drifts, when the next change may come) and the last
  decision. The view expires a few ticks after the loop stops, so "not running" means no
  planner runs the loop (``--loop off``) or none is up.
* ``pause`` / ``resume``: a paused loop keeps its statistics but decides nothing.
* ``pin PLAN_ID``: the loop never replaces this plan; it is made current if it is not.
  ``unpin`` lets the loop act again.
* ``decisions [--limit N]``: the newest decisions, newest first: why, old and new plan, moves.

Every sub-command takes ``--json`` (one JSON object) and the Redis flags of
``services.cli.store_args``. The operator's commands are recorded among the decisions.
"""

from __future__ import annotations

import argparse
import json
import time
from typing import Any

from services.cli.store_args import add_store_flags, with_store
from services.core.control.decide import decision_dict, operator_decision
from services.core.errors import InvalidInputError, NotFoundError
from services.runtime.store import Store

DECISIONS_KEPT = 1000  # as the planner's default loop_decisions_kept


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = sub.add_parser("loop", help="the control loop: status, pause, pin, decisions")
    loop_sub = parser.add_subparsers(dest="loop_command", metavar="LOOP_COMMAND", required=True)

    def command(name: str, help: str) -> argparse.ArgumentParser:
        p = loop_sub.add_parser(name, help=help)
        add_store_flags(p)
        p.add_argument("--json", action="store_true", help="print one JSON object")
        return p

    command("status", "settings, statistics, drifts and the last decision").set_defaults(
        func=cmd_status
    )
    command("pause", "decide nothing until resumed").set_defaults(func=cmd_pause)
    command("resume", "decide again").set_defaults(func=cmd_resume)
    pin = command("pin", "never replace this plan (made current if it is not)")
    pin.add_argument("plan_id", metavar="PLAN_ID", help="a stored plan's id")
    pin.set_defaults(func=cmd_pin)
    command("unpin", "let the loop replace the current plan again").set_defaults(func=cmd_unpin)
    decisions = command("decisions", "the newest decisions: why, old and new plan, moves")
    decisions.add_argument("--limit", type=int, default=20, help="how many (default 20)")
    decisions.set_defaults(func=cmd_decisions)


# ------------------------------------------------------------------------------ commands
def cmd_status(args: argparse.Namespace) -> int:
    doc = with_store(args, loop_summary)
    print(json.dumps(doc) if args.json else format_status(doc))
    return 0


def cmd_pause(args: argparse.Namespace) -> int:
    return _control(args, "pause")


def cmd_resume(args: argparse.Namespace) -> int:
    return _control(args, "resume")


def cmd_unpin(args: argparse.Namespace) -> int:
    return _control(args, "unpin")


def cmd_pin(args: argparse.Namespace) -> int:
    if not args.plan_id:
        raise InvalidInputError("PLAN_ID: must name a stored plan, got ''")
    return _control(args, "pin")


def cmd_decisions(args: argparse.Namespace) -> int:
    if args.limit < 1:
        raise InvalidInputError(f"--limit: must be >= 1, got {args.limit}")
    found = with_store(args, lambda store: store.loop_decisions(args.limit))
    if args.json:
        print(json.dumps({"decisions": found}))
    else:
        print(format_decisions(found) if found else "no decisions yet")
    return 0


def _control(args: argparse.Namespace, action: str) -> int:
    async def act(store: Store) -> dict[str, Any]:
        now = time.time()
        current = await store.current_plan_id()
        detail = ""
        if action in ("pause", "resume"):
            await store.set_loop_paused(action == "pause", now)
        elif action == "unpin":
            await store.set_loop_pinned(None, now)
        else:
            plan_id = args.plan_id
            if await store.get_plan(plan_id) is None:
                raise NotFoundError(f"PLAN_ID: plan {plan_id!r} not found")
            if current != plan_id:
                await store.set_current_plan(plan_id)
                detail = f"made current (was {current})"
                current = plan_id
            await store.set_loop_pinned(plan_id, now)
        record = operator_decision(action, now, current, detail)  # type: ignore[arg-type]
        await store.put_loop_decision(decision_dict(record), DECISIONS_KEPT)
        return {"action": action, "plan": current, "detail": detail, **await _control_of(store)}

    doc = with_store(args, act)
    if args.json:
        print(json.dumps(doc))
    else:
        pinned = doc["control"]["pinned"] or "-"
        paused = "yes" if doc["control"]["paused"] else "no"
        extra = f"; {doc['detail']}" if doc["detail"] else ""
        print(f"loop {action}: paused {paused}, pinned {pinned}, current plan {doc['plan']}{extra}")
    return 0


async def _control_of(store: Store) -> dict[str, Any]:
    return {"control": await store.loop_control()}


async def loop_summary(store: Store) -> dict[str, Any]:
    """``{"control", "status" (None when no loop runs), "last_decision" (or None)}``; also what
    ``scepsy status`` shows."""
    last = await store.loop_decisions(1)
    return {
        "control": await store.loop_control(),
        "status": await store.loop_status(),
        "last_decision": last[0] if last else None,
    }


# ------------------------------------------------------------------------------ text
def format_status(doc: dict[str, Any]) -> str:
    lines = [summary_line(doc)]
    status = doc["status"]
    if status is not None:
        lines += ["", *workflow_table(status)]
        for d in status["drifts"]:
            since = status["at"] - d["since"]
            lines.append(f"drift {d['kind']} {d['subject']} for {since:.0f} s: {d['detail']}")
        if status["next_change_at"]:
            lines.append(f"next change allowed at {_when(status['next_change_at'])}")
    if doc["last_decision"] is not None:
        lines += ["", "last decision:", format_decisions([doc["last_decision"]])]
    return "\n".join(lines)


def workflow_table(status: dict[str, Any]) -> list[str]:
    """The loop's statistics per workflow and LLM over its window."""
    if not status["workflows"]:
        return [f"no traffic in the last {status['window_s']:g} s"]
    rows: list[tuple[str, ...]] = [
        ("WORKFLOW", "REQUESTS", "RATE", "E2E", "LLM", "N", "P", "SHARE", "TOKENS")
    ]
    for name, w in status["workflows"].items():
        head = (
            name,
            str(w["requests"]),
            "idle" if w["idle"] else f"{w['rate_rps']:.3g}/s",
            f"{w['e2e_s']:.3g}s",
        )
        for i, (model, m) in enumerate(w["llms"].items()):
            tokens = f"{m['prompt_tokens']:.0f}/{m['completion_tokens']:.0f}"
            first = head if i == 0 else ("", "", "", "")
            rows.append(
                (*first, model, f"{m['n']:.3g}", f"{m['p']:.3g}", f"{m['share']:.2f}", tokens)
            )
        if not w["llms"]:
            rows.append((*head, "-", "", "", "", ""))
    return [f"window {status['window_s']:g} s:", *_table(rows)]


def summary_line(doc: dict[str, Any]) -> str:
    """One line for ``scepsy status``: running or not, mode, pause and pin."""
    control, status = doc["control"], doc["status"]
    flags = ("paused, " if control["paused"] else "") + (
        f"pinned {control['pinned']}, " if control["pinned"] else ""
    )
    if status is None:
        return f"loop: not running ({flags}no planner ran a tick lately)"
    age = max(0.0, time.time() - status["at"])
    return (
        f"loop: {status['mode']} ({flags}plan {status['plan'] or 'none'}, last tick "
        f"{age:.0f} s ago by {status['holder']})"
    )


def format_decisions(decisions: list[dict[str, Any]]) -> str:
    lines: list[str] = []
    for d in decisions:
        change = d["old_plan"] or "-"
        if d["new_plan"] and d["new_plan"] != d["old_plan"]:
            change += f" -> {d['new_plan']}"
        lines.append(f"{_when(d['at'])}  {d['action']} {d['outcome']}  {change}")
        for r in d["reasons"]:
            lines.append(f"    {r['kind']} {r['subject']}: {r['detail']}")
        if d["rates"]:
            rates = ", ".join(f"{w} {r:g} req/s" for w, r in d["rates"].items())
            lines.append(f"    new targets: {rates}")
        if d["traced"]:
            lines.append(f"    from the router's trace: {', '.join(d['traced'])}")
        if d["detail"]:
            lines.append(f"    {d['detail']}")
        if d["kept"] is not None:
            lines.append(f"    engines kept {d['kept']}, changed {len(d['moves'])}")
        for m in d["moves"]:
            arrow = f"{m['before'] or '-'} -> {m['after'] or '-'}"
            lines.append(f"      {m['action']:<6} {m['model']}/{m['replica']}  {arrow}")
    return "\n".join(lines)


def _when(ts: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ts))


def _table(rows: list[tuple[str, ...]]) -> list[str]:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]
