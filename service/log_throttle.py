"""Keeps a repeated log message from flooding the log: at most one line per key and
period, which says how many like it were held back since."""

from __future__ import annotations

import threading
import time
from collections.abc import Hashable


class LogThrottle:
    """Decides, per key, whether a message may be logged now (thread-safe)."""

    def __init__(self, period: float = 10.0, max_keys: int = 10_000) -> None:
        self.period = period
        self.max_keys = max_keys
        self._lock = threading.Lock()
        self._last: dict[Hashable, float] = {}
        self._held: dict[Hashable, int] = {}
        self.seen = 0  # messages offered
        self.logged = 0  # messages let through

    def admit(self, key: Hashable = None) -> int | None:
        """None: hold this message back. Otherwise log it; the number returned is how
        many messages of this key were held back since the last one logged."""
        now = time.monotonic()
        with self._lock:
            self.seen += 1
            last = self._last.get(key)
            if last is not None and now - last < self.period:
                self._held[key] = self._held.get(key, 0) + 1
                return None
            if len(self._last) > self.max_keys:  # keys are few in practice; stay bounded
                self._last.clear()
                self._held.clear()
            self._last[key] = now
            self.logged += 1
            return self._held.pop(key, 0)
