"""The profiler's backend registry: every ``ProfileBackend`` by the name used in requests.

The protocol and the analytic backend are pure (``services.core.perf.backends``); backends that
drive real engines join the registry here. The Profiler service, the planner's in-process profile
source and the CLI all look backends up in ``BACKENDS``.
"""

from __future__ import annotations

from services.core.perf.backends import AnalyticBackend, ProfileBackend

BACKENDS: dict[str, ProfileBackend] = {b.name: b for b in (AnalyticBackend(),)}
