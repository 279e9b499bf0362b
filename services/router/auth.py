"""Optional bearer-token authentication, shared by the HTTP and gRPC front ends.

With no keys configured every call is accepted. Otherwise the ``Authorization: Bearer <key>``
header (HTTP) or ``authorization`` metadata (gRPC) must carry one of the keys; the comparison
takes the same time whatever the key, and neither the keys nor the presented token are logged.
"""

from __future__ import annotations

import hmac
from collections.abc import Iterable

from services.router.errors import AuthenticationError
from services.router.metrics import RouterMetrics


class ApiKeys:
    def __init__(self, keys: Iterable[str], metrics: RouterMetrics) -> None:
        self._keys = tuple(k.encode() for k in keys)
        self._metrics = metrics

    @property
    def enabled(self) -> bool:
        return bool(self._keys)

    def check(self, authorization: str | None) -> None:
        """Accept the call or raise ``AuthenticationError`` (the message names no key)."""
        if not self._keys:
            return
        token = _bearer(authorization)
        if token is None:
            self._metrics.unauthenticated.inc()
            raise AuthenticationError("missing API key: send 'Authorization: Bearer <key>'")
        presented = token.encode()
        # Compare against every key, so that the time taken does not tell which one matched.
        matched = False
        for key in self._keys:
            matched |= hmac.compare_digest(presented, key)
        if not matched:
            self._metrics.unauthenticated.inc()
            raise AuthenticationError("incorrect API key provided")


def _bearer(authorization: str | None) -> str | None:
    if not authorization:
        return None
    scheme, _, token = authorization.strip().partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return None
    return token.strip()
