"""The workflow simulator: discrete-event serving of workflow programs on simulated clusters.

``program`` and ``workflows`` (what requests do), ``arrivals``, ``simulator`` (the event loop; each
replica batches its calls with ``services.core.perf.scheduler``), ``measure`` (curve points),
``systems`` (Scepsy and the baselines as planners), ``evaluation``, ``checks``, ``runs``,
``results`` and ``report`` (the head-to-head comparison).
"""
