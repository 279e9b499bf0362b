"""The workflow simulator: discrete-event serving of workflow programs on simulated clusters.

``engine`` (one replica's continuous batching), ``program`` and ``workflows`` (what requests do),
``arrivals``, ``simulator`` (the event loop), ``measure`` (curve points), ``systems`` (Scepsy and
the baselines as planners), ``evaluation``, ``checks``, ``runs``, ``results`` and ``report`` (the
head-to-head comparison).
"""
