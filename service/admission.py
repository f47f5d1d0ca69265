"""Admission control: at most N generations in flight; the next one is refused at once.

A server that queues without bound answers everything late under overload; refusing the
excess with RESOURCE_EXHAUSTED tells clients (and load balancers) to back off or go
elsewhere while the admitted requests keep their latency.
"""

from __future__ import annotations

import threading

import grpc

from loraloop.service.validation import RequestError


class ConcurrencyLimit:
    """Counts the generations in flight and refuses one beyond `limit`."""

    def __init__(self, limit: int) -> None:
        if limit < 1:
            raise ValueError(f"limit must be at least 1, got {limit}")
        self.limit = limit
        self.in_flight = 0
        self.peak = 0
        self.refused = 0
        self.closed = False
        self._lock = threading.Lock()

    def close(self) -> None:
        """Admit nothing more: the server is stopping (its drain window is over)."""
        with self._lock:
            self.closed = True

    def enter(self) -> None:
        """Take a place, or raise RequestError: RESOURCE_EXHAUSTED when all are taken,
        UNAVAILABLE once closed (which clients' retry policies retry on another replica;
        grpc itself may answer a call that arrives in the middle of its own stop with
        CANCELLED, which they do not)."""
        with self._lock:
            if self.closed:
                raise RequestError(
                    grpc.StatusCode.UNAVAILABLE,
                    "the server is shutting down: retry, another replica will answer",
                )
            if self.in_flight >= self.limit:
                self.refused += 1
                raise RequestError(
                    grpc.StatusCode.RESOURCE_EXHAUSTED,
                    f"the server is already generating for {self.limit} requests (its "
                    "max_concurrent_requests): retry with backoff, or raise "
                    "LORALOOP_MAX_CONCURRENT_REQUESTS",
                )
            self.in_flight += 1
            self.peak = max(self.peak, self.in_flight)

    def leave(self) -> None:
        with self._lock:
            self.in_flight -= 1
