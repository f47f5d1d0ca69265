"""The sender's writes to the spill journal: appends, with a full journal or a write error
counted as a drop; events Kafka did not take (journaled unless they can never go); batched
fsyncs; and the journal's first load (a CRC scan), retried while it fails."""

from __future__ import annotations

import time

from kafka.errors import (
    IllegalStateError,
    InvalidRecordError,
    InvalidTopicError,
    MessageSizeTooLargeError,
    RecordListTooLargeError,
)

from loraloop.service.event_producer import ProducerLink
from loraloop.service.event_stats import EventStats
from loraloop.service.spill_journal import Position, SpilledEvent, SpillJournal

__all__ = ["SpillWriter", "is_fatal", "is_permanent"]

# Errors no retry can fix: the event is counted as rejected instead of retried forever.
_PERMANENT = (
    MessageSizeTooLargeError,
    RecordListTooLargeError,
    InvalidTopicError,
    InvalidRecordError,
    TypeError,
    ValueError,
)


def is_permanent(result: object) -> bool:
    """An error no retry can fix (its event is rejected for good)."""
    return isinstance(result, _PERMANENT)


def is_fatal(exc: BaseException) -> bool:
    """An error after which the producer must be replaced (e.g. a fatal idempotence error)."""
    return isinstance(exc, IllegalStateError) or not getattr(exc, "retriable", True)


class SpillWriter:
    """Appends to the journal and keeps it synced and loaded, for the sender thread."""

    def __init__(
        self, journal: SpillJournal, stats: EventStats, link: ProducerLink, sync_seconds: float
    ) -> None:
        self._journal = journal
        self._stats = stats
        self._link = link
        self._sync_every = sync_seconds
        self._last_sync = 0.0
        self.load_tried = False
        self._load_at = 0.0  # next try of the journal's load, while it fails
        self._load_pause = 0.1

    def spill(self, event: SpilledEvent, count_drop: bool = True) -> Position | None:
        """Append to the journal; None (and, if `count_drop`, a counted drop) if it failed."""
        try:
            position = self._journal.append(event)
        except OSError as exc:
            self._stats.drop(
                "spill_error",
                "spill journal write failed (%s): event dropped",
                exc,
                counted=count_drop,
            )
            return None
        if position is None:
            self._stats.drop(
                "spill_full",
                "spill journal full (%d of %d bytes): an event for %s dropped",
                self._journal.bytes,
                self._journal.max_bytes,
                event.topic,
                counted=count_drop,
            )
            return None
        self._stats.spilled += 1
        self._stats.warn["spill"](
            "Kafka unreachable or behind: events spill to %s", self._journal.dir
        )
        return position

    def copy(self, event: SpilledEvent) -> Position | None:
        """Copy an event waiting in the producer. A copy that does not fit is not a drop
        yet: the original may still be delivered."""
        return self.spill(event, count_drop=False)

    def failed(self, event: SpilledEvent, exc: BaseException) -> None:
        """An event Kafka did not take: into the journal, unless it can never go."""
        if is_permanent(exc):
            self._stats.drop(
                "rejected", "Kafka rejected an event for %s for good: %s", event.topic, exc
            )
            return
        if is_fatal(exc):
            self._link.needs_reset = True  # use a new producer
        self.spill(event)

    def sync(self, force: bool) -> None:
        now = time.monotonic()
        if force or now - self._last_sync >= self._sync_every:
            try:
                self._journal.sync()
            except OSError as exc:
                self._stats.warn["spill_error"]("spill journal fsync failed: %s", exc)
            self._last_sync = now

    def load(self) -> None:
        """Index what a previous process left in the journal (a CRC scan of every record),
        here rather than on the thread that created the event log. A failure is retried
        with a back-off on later turns, while the loop goes on sending straight to Kafka
        (an event that must spill meanwhile fails to and is counted as spill_error)."""
        if self._journal.loaded.is_set() or time.monotonic() < self._load_at:
            return
        try:
            self._journal.load()
        except OSError as exc:
            self._stats.sender_errors += 1
            self._stats.warn["sender"](
                "spill journal %s unreadable (%s); events go straight to Kafka while it is retried",
                self._journal.dir,
                exc,
            )
            self._load_at = time.monotonic() + self._load_pause
            self._load_pause = min(5.0, 2 * self._load_pause)
        finally:
            self.load_tried = True
