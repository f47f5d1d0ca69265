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
        self._lock = threading.Lock()

    def enter(self) -> None:
        """Take a place, or raise RequestError(RESOURCE_EXHAUSTED) when all are taken."""
        with self._lock:
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
