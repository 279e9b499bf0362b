"""The spec a re-plan is made from: the current plan's spec, changed only where load drifted.

A workflow whose rate drifted gets its observed rate (4 significant digits). A workflow whose
shares, fan-out, token mix or latency drifted also gets its statistics from the router's recorded
trace (``trace: router``; the planner reads the loop's window), replacing inline ``stats`` or a
trace file; a ``trace_workflow`` it had is kept, it names the workflow in the trace. Everything
else, and every workflow without drift, is left as written. A re-plan for nodes alone leaves the
text unchanged, so the new plan differs from the old one by its nodes only (a re-placement).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from services.core.errors import InvalidInputError
from services.core.workload.spec import RECORDED_TRACE


def traced_name(workflow: Mapping[str, Any]) -> str:
    """The name a spec workflow's calls carry in the trace."""
    return str(workflow.get("trace_workflow") or workflow.get("name"))


def spec_workflows(spec_text: str) -> list[dict[str, Any]]:
    """The workflow entries of a spec (YAML or JSON); ``InvalidInputError`` when it has none."""
    doc = _load(spec_text)
    workflows = doc.get("workflows")
    if not isinstance(workflows, list) or not all(isinstance(w, dict) for w in workflows):
        raise InvalidInputError(f"spec: workflows: must be a list of mappings, got {workflows!r}")
    return workflows


def respec(spec_text: str, rates: Mapping[str, float], traced: frozenset[str] = frozenset()) -> str:
    """``spec_text`` with the workflows named in ``rates`` (by spec name) at those rates and
    those in ``traced`` planned from the router's trace (module docstring). Returns the text
    unchanged when there is nothing to change."""
    if not rates and not traced:
        return spec_text
    import yaml

    doc = _load(spec_text)
    patched = []
    for workflow in spec_workflows(spec_text):
        entry = dict(workflow)
        name = str(entry.get("name"))
        if name in rates:
            if not rates[name] > 0:
                raise InvalidInputError(f"rates.{name}: must be > 0, got {rates[name]!r}")
            entry["rate"] = float(f"{rates[name]:.4g}")
        if name in traced:
            entry.pop("stats", None)
            entry["trace"] = RECORDED_TRACE
        patched.append(entry)
    doc["workflows"] = patched
    return str(yaml.safe_dump(doc, sort_keys=False))


def _load(spec_text: str) -> dict[str, Any]:
    import yaml

    try:
        doc = yaml.safe_load(spec_text)
    except yaml.YAMLError as exc:
        raise InvalidInputError(f"spec: not valid YAML: {exc}") from None
    if not isinstance(doc, dict):
        raise InvalidInputError(f"spec: top level: must be a mapping, got {type(doc).__name__}")
    return doc
