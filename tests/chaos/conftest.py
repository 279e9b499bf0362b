"""Chaos tests: real processes (Redis, routers, engines) killed, stopped and restarted under load.
Every test is bounded in time; each call must complete or end with a clear error within a bound.
The router fixtures are the router tests' (real HTTP and gRPC on port 0, real Redis)."""

from tests.router.conftest import start_router, start_upstream  # noqa: F401 - fixtures
