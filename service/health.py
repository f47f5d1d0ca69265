"""The standard gRPC health service on the asyncio server.

grpc's synchronous `grpc_health.v1.health.HealthServicer` must not be used on a grpc.aio
server: each Watch call then holds one of the event loop's default executor threads (the
ones `asyncio.to_thread` uses) until the process ends, even after the client cancels, so a
handful of Watches starve every call that needs a thread, and one keeps `asyncio.run` from
ever returning after SIGTERM. `HealthService` is grpc's asyncio servicer
(`grpc_health.v1.health.aio.HealthServicer`: Check, set(), enter_graceful_shutdown()), with
a Watch that also ends when the server closes it (`close()`), after sending the current
status, so an open Watch does not hold the server's stop for its whole grace period.
"""

from __future__ import annotations

import asyncio
from typing import Any

from grpc_health.v1 import health_pb2
from grpc_health.v1.health import aio

ServingStatus = int  # a health_pb2.HealthCheckResponse.ServingStatus value


class HealthService(aio.HealthServicer):
    """grpc's asyncio health servicer whose Watch streams can be ended by `close()`."""

    def __init__(self) -> None:
        super().__init__()
        # What Watch streams send: a copy of the statuses, kept by set() and
        # enter_graceful_shutdown(), and an event replaced on every change.
        self._statuses: dict[str, ServingStatus] = {"": health_pb2.HealthCheckResponse.SERVING}
        self._changed = asyncio.Event()
        self._closed = False
        self._shutting_down = False

    def _notify(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    async def set(self, service: str, status: ServingStatus) -> None:
        await super().set(service, status)
        if not self._shutting_down:  # the base ignores set() from then on too
            self._statuses[service] = status
            self._notify()

    async def enter_graceful_shutdown(self) -> None:
        """NOT_SERVING for every service, for good (later set() calls are ignored)."""
        await super().enter_graceful_shutdown()
        self._shutting_down = True
        for service in self._statuses:
            self._statuses[service] = health_pb2.HealthCheckResponse.NOT_SERVING
        self._notify()

    def close(self) -> None:
        """End every Watch stream (status OK) once it has sent the current status; a Watch
        that starts later sends the status and ends at once."""
        self._closed = True
        self._notify()

    async def Watch(self, request: health_pb2.HealthCheckRequest, context: Any) -> None:
        last: ServingStatus | None = None
        while True:
            changed = self._changed  # taken before reading: no change is missed
            status = self._statuses.get(
                request.service, health_pb2.HealthCheckResponse.SERVICE_UNKNOWN
            )
            if status != last:
                await context.write(health_pb2.HealthCheckResponse(status=status))
                last = status
            if self._closed:
                return
            await changed.wait()
