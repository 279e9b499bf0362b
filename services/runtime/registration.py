"""Every service process announces itself in Redis: what it is, where it listens, its PID.

``Registration`` runs beside a started ``Server`` (``serve()`` starts it once the server reports
SERVING): it puts a ``ServiceRecord`` (name, gRPC address, metrics address, PID, host name, the
binding's ``announce`` fields such as the router's ``http_address``) under a key that expires
``service_ttl_s`` after the last refresh, and refreshes it every third of that. At shutdown the
record is removed before the server drains, so readers stop seeing a stopping service at once; a
process that dies without stopping disappears when the TTL runs out.

Readers (``scepsy up`` waiting for the processes it started, ``scepsy status``) call
``Store.list_services()``. A refresh that fails (Redis down) is logged and retried at the next
one; serving goes on.
"""

from __future__ import annotations

import contextlib
import os
import socket
import time
from collections.abc import Callable
from dataclasses import replace

from services.core.errors import UnavailableError
from services.runtime.config import ServiceConfig
from services.runtime.logging import get_logger
from services.runtime.periodic import Periodic
from services.runtime.server import Server
from services.runtime.store import ServiceRecord, Store

log = get_logger(__name__)


class Registration:
    def __init__(
        self,
        store: Store,
        name: str,
        config: ServiceConfig,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._store = store
        self._name = name
        self._config = config
        self._clock = clock
        self._record: ServiceRecord | None = None
        self._refreshing = Periodic(self._refresh, config.service_ttl_s / 3, "service-registration")

    @property
    def record(self) -> ServiceRecord | None:
        return self._record

    async def start(self, server: Server) -> ServiceRecord:
        """Put the record of ``server`` (started) and keep it fresh until ``stop``."""
        now = self._clock()
        self._record = ServiceRecord(
            name=self._name,
            address=server.address,
            metrics_address=server.metrics_address,
            pid=os.getpid(),
            host=socket.gethostname(),
            started_at=now,
            heartbeat_at=now,
            extra=server.announced(),
        )
        await self._refresh()
        self._refreshing.start()
        return self._record

    async def stop(self) -> None:
        await self._refreshing.stop()
        if self._record is not None:
            with contextlib.suppress(UnavailableError):
                await self._store.remove_service(self._record.id)

    async def _refresh(self) -> None:
        assert self._record is not None
        record = self._record = replace(self._record, heartbeat_at=self._clock())
        try:
            await self._store.put_service(record, self._config.service_ttl_s)
        except UnavailableError as exc:
            log.warning("registration_failed", service=record.id, error=str(exc))
