"""The profiler's backend registry: every ``ProfileBackend`` by the name used in requests.

The protocol and the analytic backend are pure (``services.core.perf.backends``); backends that
drive real engines (``vllm``: ``services.profiler.vllm_backend``) join the registry here. The
Profiler service, the planner's in-process profile source and the CLI all look backends up in
``BACKENDS``.
"""

from __future__ import annotations

from services.core.perf.backends import AnalyticBackend, ProfileBackend
from services.profiler.vllm_backend import VllmBackend

# ``vllm`` starts an engine per profile (weights from $SCEPSY_MODEL_DIRS, else the Hub id) and
# measures it with the default sweep; ``scepsy profile --backend vllm`` configures its own.
BACKENDS: dict[str, ProfileBackend] = {b.name: b for b in (AnalyticBackend(), VllmBackend())}
