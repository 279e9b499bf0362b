"""The profiler: latency-vs-load curves per (model, GPU type, TP, fraction), from real vLLM engines
or the analytic backend in services.core."""
