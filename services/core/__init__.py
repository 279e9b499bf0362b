"""Pure domain code shared by every service.

Contract: nothing under ``services.core`` imports grpc, redis, pynvml, asyncio or does I/O beyond
reading a file whose path the caller hands in. Services and the runtime depend on this package,
never the other way round (a test checks it in a fresh interpreter).
"""
