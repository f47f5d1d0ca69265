"""Interaction and feedback events to Kafka without blocking a request, and without losing
them while Kafka is away.

`publish` (the request path) only puts the event on a bounded in-memory queue. One sender
thread takes events off it and either

- hands them to the Kafka producer (idempotent, acks=all) while Kafka keeps up, or
- appends them to the local spill journal (`service/spill_journal.py`) while it does not:
  no producer is connected, the journal still holds older events, or an event handed to
  the producer has waited `stall_seconds` for its acknowledgement. At that point the events
  still waiting in the producer are copied to the journal too (a copy is skipped later if
  Kafka does acknowledge the original), so a crash during an outage loses little.

When nothing has been acknowledged for `abandon_seconds` (setting event_abandon_seconds),
the sender gives up on that producer (what it held is in the journal) and connects a new
one in the background: kafka-python's I/O thread spins at full CPU while it holds records
for a broker that is gone, and that CPU is the engine's. The producer's own request
timeout is the same `abandon_seconds`, so a broker that answers a request within the
producer's timeout is never abandoned (which would send the journal's copies of events
Kafka did take: duplicates). Once a producer is connected and nothing handed to it is
outstanding, the sender drains the journal oldest first, one chunk at a time, and commits
what Kafka acknowledged; when the journal is empty, events go straight to the producer
again. An event counts as delivered only on its delivery callback's success (acks=all).

Stopping (SIGTERM): `stop` keeps delivering the queue and the journal for up to
`drain_seconds` (setting event_drain_seconds) while Kafka answers, and stops early only
when it does not (no producer, or no acknowledgement for `abandon_seconds`). What is left
stays in the journal, is logged with its count and kept in `left_at_stop`; the next
process on the same spill directory delivers it (a pod whose journal is an emptyDir
loses it with the pod: see helm/loraloop/values.yaml, server.spill).

Order. Events of one key (one user) reach Kafka in the order they were published while
every send succeeds, and across an outage: the journal is first in, first out; it is
drained only when nothing sent directly is outstanding, and direct sends resume only once
it is empty. One exception: an event whose direct send fails for good (a fatal producer
error; not a slow or absent broker, which is journaled in order) after newer events of the
same key were acknowledged goes to the journal and reaches Kafka after them. Delivery is
at least once: the journal's copy of an event whose acknowledgement was lost with an
abandoned producer, and records delivered just before a crash or a failed cursor write,
can be delivered twice.

A topic Kafka does not have (the broker answers metadata requests, but without the topic,
e.g. with auto-creation off) would block the journal, which is drained in order, for every
topic behind it: its events are retried for `missing_topic_seconds` (at least three
tries), then dropped and counted as `no_topic`; while it stays missing, new events for it
are dropped at once, and one is tried again every few seconds to find out whether it was
created.

Nothing is dropped silently. A full queue (reason `queue_full`), a full journal
(`spill_full`), a journal write error (`spill_error`), an event Kafka rejects for good
(`rejected`), an event for a topic Kafka does not have (`no_topic`), an event lost to an
unexpected error in the sender (`sender_error`) and a journal tail torn by a crash
(`journal_torn`) are counted in `dropped_by`, logged at most every few seconds, and
exported by service/metrics.py. The sender thread survives any error: it logs it, counts
it in `sender_errors`, backs off and goes on (`sender_alive` is exported as a gauge).

Parts: this module is the facade (publish, flush, stop, the state metrics read); the
sender thread is service/event_sender.py, the producer service/event_producer.py, what
waits for Kafka's acknowledgement (and the typed delivery results) service/event_inflight.py,
missing topics service/missing_topics.py, journal writes service/spill_writer.py, the
journal's drain service/journal_drain.py, counters and warnings service/event_stats.py.
"""

from __future__ import annotations

import contextlib
import os
import queue
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, overload

from loraloop.core.settings import StartupError
from loraloop.service.event_inflight import Outstanding
from loraloop.service.event_producer import ProducerLink
from loraloop.service.event_sender import STOP, EventQueue, Sender, StopRequest
from loraloop.service.event_stats import DROP_REASONS, EventStats
from loraloop.service.journal_drain import JournalDrain
from loraloop.service.missing_topics import MissingTopics, TopicMissing
from loraloop.service.spill_journal import SpilledEvent, SpillJournal
from loraloop.service.spill_writer import SpillWriter

if TYPE_CHECKING:
    from loraloop.core.settings import Settings

__all__ = ["DROP_REASONS", "EventLog", "SpillDirUnusable", "TopicMissing"]

_STOP_GRACE = 5.0  # stop() waits this long past its deadline for the sender to close


class SpillDirUnusable(StartupError, RuntimeError):
    """The spill directory cannot be created, locked or listed (raised at construction)."""


class _Counter:
    """`events.<name>`: the event log's counter of that name, read-only."""

    def __set_name__(self, owner: type[EventLog], name: str) -> None:
        self._name = name

    @overload
    def __get__(self, events: None, owner: type[EventLog]) -> _Counter: ...
    @overload
    def __get__(self, events: EventLog, owner: type[EventLog] | None = None) -> int: ...
    def __get__(
        self, events: EventLog | None, owner: type[EventLog] | None = None
    ) -> int | _Counter:
        if events is None:
            return self
        count: int = getattr(events._stats, self._name)
        return count


class EventLog:
    """Events to Kafka from a bounded queue, a sender thread and a spill journal."""

    def __init__(
        self,
        bootstrap: str,
        max_queue: int,
        *,
        spill_dir: Path | str,
        spill_max_bytes: int,
        client_id: str = "loraloop-server",
        stall_seconds: float = 1.0,
        abandon_seconds: float = 5.0,
        drain_seconds: float = 10.0,
        missing_topic_seconds: float = 30.0,
        chunk_records: int = 1000,
        sync_seconds: float = 0.05,
    ) -> None:
        self._queue: EventQueue = queue.Queue(max_queue)
        # places in the queue held for events published later (see `reserve`)
        self._reserved = 0
        self._reserve_lock = threading.Lock()
        self.journal = _claim_journal(spill_dir, spill_max_bytes)
        self._stats = stats = EventStats()
        self._stop = StopRequest(threading.Event(), drain_seconds)
        # The producer's own request timeout is abandon_seconds: see the module's docstring.
        abandon_after = max(abandon_seconds, stall_seconds)
        self._link = link = ProducerLink(
            bootstrap, client_id, abandon_after, self._stop.stopping, stats.warn["kafka"]
        )
        self.connected = link.connected
        self._outstanding = outstanding = Outstanding()
        missing = MissingTopics(missing_topic_seconds, stats)
        self._writer = writer = SpillWriter(self.journal, stats, link, sync_seconds)
        self._drain = drain = JournalDrain(
            self.journal, link, outstanding, missing, writer, stats, chunk_records
        )
        self._sender = Sender(
            events=self._queue,
            journal=self.journal,
            stats=stats,
            link=link,
            outstanding=outstanding,
            missing=missing,
            writer=writer,
            drain=drain,
            stop=self._stop,
            stall_seconds=stall_seconds,
            abandon_seconds=abandon_after,
        )
        self._thread = threading.Thread(target=self._run, name="event-log", daemon=True)

    @classmethod
    def from_settings(cls, settings: Settings) -> EventLog:
        return cls(
            settings.kafka_bootstrap,
            settings.event_queue_size,
            spill_dir=settings.spill_dir or settings.adapter_store.parent / "event-spill",
            spill_max_bytes=settings.spill_max_bytes,
            abandon_seconds=settings.event_abandon_seconds,
            drain_seconds=settings.event_drain_seconds,
            missing_topic_seconds=settings.event_missing_topic_seconds,
        )

    def start(self) -> None:
        self._link.start_connector()
        self._thread.start()

    def _run(self) -> None:
        # The thread's outermost frame stays in this file (loadtests/profile.py looks for it).
        self._sender.run()

    # --- the request path ---------------------------------------------------------------
    def reserve(self) -> bool:
        """Hold a place in the queue for one event to be published later with
        `reserved=True` (or handed back with `unreserve`); False when the queue, counting
        the places already held, is full. Generate holds one before it generates, so the
        interaction of a response it answers always has a place: a call that could not
        be logged is refused before any work, never answered and then dropped."""
        with self._reserve_lock:
            if self._queue.qsize() + self._reserved >= self._queue.maxsize:
                return False
            self._reserved += 1
            return True

    def unreserve(self) -> None:
        """Hand back a place held by `reserve` whose event will not be published."""
        with self._reserve_lock:
            self._reserved = max(0, self._reserved - 1)

    @property
    def reserved(self) -> int:
        """Places in the queue held for events not published yet."""
        return self._reserved

    def publish(
        self,
        topic: str,
        key: str,
        value: bytes | None,
        timestamp_ms: int | None = None,
        *,
        reserved: bool = False,
    ) -> bool:
        """Queue an event (None: a tombstone); False, and counted, when the queue is full.

        `reserved`: the event takes the place `reserve` held for it (it never finds the
        queue full, unless the queue is stopping); otherwise places held for others count
        as taken. `timestamp_ms` becomes the Kafka record's timestamp, kept across a stay
        in the journal (None: Kafka stamps the record when the sender hands it over, which
        after an outage is the drain time)."""
        try:
            with self._reserve_lock:
                if reserved:
                    self._reserved = max(0, self._reserved - 1)
                elif self._queue.qsize() + self._reserved >= self._queue.maxsize:
                    raise queue.Full
                self._queue.put_nowait(SpilledEvent(topic, key.encode(), value, timestamp_ms))
        except queue.Full:
            self._stats.drop(
                "queue_full",
                "event queue full (%d): an event for %s dropped",
                self._queue.maxsize,
                topic,
            )
            return False
        self._stats.accepted += 1
        return True

    # --- state, read by metrics and tests from any thread --------------------------------
    # Counters (see EventStats), written by publish() and the sender thread.
    accepted = _Counter()
    sent = _Counter()
    delivered = _Counter()
    spilled = _Counter()
    drained = _Counter()
    sender_errors = _Counter()

    @property
    def left_at_stop(self) -> int | None:
        """Events left in the journal by stop() (None before it)."""
        return self._stats.left_at_stop

    @property
    def depth(self) -> int:
        """Events waiting in the in-memory queue."""
        return self._queue.qsize()

    @property
    def backlog(self) -> int:
        """Events accepted and neither acknowledged by Kafka nor dropped yet."""
        in_producer_only = self._outstanding.in_producer_only
        return self._queue.qsize() + in_producer_only + self.journal.pending - len(self._drain.skip)

    @property
    def dropped_by(self) -> dict[str, int]:
        """Events lost, by reason (see the module's docstring)."""
        dropped: dict[str, int] = dict(self._stats.dropped.items())
        return dropped | {"journal_torn": self.journal.torn}

    @property
    def dropped(self) -> int:
        return sum(self.dropped_by.values())

    @property
    def sender_alive(self) -> bool:
        """Whether the sender thread runs (False before start and after stop)."""
        return self._thread.is_alive()

    @property
    def spilling(self) -> bool:
        """Whether new events go to the journal rather than straight to Kafka."""
        return self._sender.spilling()

    def flush(self, timeout: float = 10.0) -> bool:
        """Wait until every accepted event was acknowledged by Kafka or dropped."""
        deadline = time.monotonic() + timeout
        while not self._settled():
            if time.monotonic() > deadline:
                return False
            time.sleep(0.01)
        return True

    def stop(self, timeout: float | None = None) -> None:
        """Deliver what is queued and journaled within `timeout` (default: drain_seconds)
        while Kafka answers; keep the rest in the journal for the next start (logged, and
        counted in `left_at_stop`); close the producer and the journal."""
        if timeout is not None:
            self._stop.timeout = timeout
        deadline = time.monotonic() + self._stop.timeout
        self._stop.deadline = deadline
        self._stop.stopping.set()
        # The marker only ends the sender's wait sooner: once stopping, it also ends when
        # it finds the queue empty, so a full queue (or a zero timeout) cannot keep it on.
        with contextlib.suppress(queue.Full):
            self._queue.put(STOP, timeout=max(0.0, deadline - time.monotonic()))
        # the sender's own deadline is the same; the grace covers closing the producer
        self._thread.join(max(0.0, deadline - time.monotonic()) + _STOP_GRACE)
        self._link.join(5)

    def _settled(self) -> bool:
        accepted = self._stats.accepted
        return (
            (self.journal.loaded.is_set() or self._writer.load_tried)
            and self._stats.routed == accepted
            and self._outstanding.idle()
            and self.journal.pending == 0
        )


def _claim_journal(spill_dir: Path | str, spill_max_bytes: int) -> SpillJournal:
    """Only claims the slot: the scan of what it holds runs on the sender thread. A
    directory that cannot be created, locked or listed fails here, at start-up."""
    try:
        journal = SpillJournal(spill_dir, spill_max_bytes, load=False)
        os.listdir(journal.dir)
    except OSError as exc:
        raise SpillDirUnusable(
            f"spill directory {spill_dir} cannot be used ({exc}): give the server a "
            "writable directory in LORALOOP_SPILL_DIR"
        ) from exc
    return journal
