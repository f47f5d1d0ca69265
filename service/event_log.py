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
"""

from __future__ import annotations

import collections
import contextlib
import logging
import os
import queue
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kafka import KafkaProducer
from kafka.errors import (
    IllegalStateError,
    InvalidRecordError,
    InvalidTopicError,
    KafkaError,
    KafkaTimeoutError,
    MessageSizeTooLargeError,
    RecordListTooLargeError,
)
from loraloop.service.log_throttle import LogThrottle
from loraloop.service.spill_journal import Position, Record, SpilledEvent, SpillJournal

from loraloop.core.kafka.producers import force_close as _force_close

if TYPE_CHECKING:
    from loraloop.core.settings import Settings

__all__ = ["DROP_REASONS", "EventLog", "SpillDirUnusable"]

log = logging.getLogger(__name__)

DROP_REASONS = (
    "queue_full",
    "spill_full",
    "spill_error",
    "rejected",
    "no_topic",
    "sender_error",
    "journal_torn",
)
# Errors no retry can fix: the event is counted as rejected instead of retried forever.
_PERMANENT = (
    MessageSizeTooLargeError,
    RecordListTooLargeError,
    InvalidTopicError,
    InvalidRecordError,
    TypeError,
    ValueError,
)
_STOP = object()
_SKIPPED = object()  # a journal record whose event Kafka acknowledged before it was read
_NO_TOPIC = object()  # a journal record dropped because its topic is missing (counted)
_STOP_GRACE = 5.0  # stop() waits this long past its deadline for the sender to close
_TAKE = 512  # events taken off the queue per turn of the sender loop
_MAX_BLOCK_MS = 1000  # send() waiting for a topic's metadata, on the sender thread
_MISSING_TRIES = 3  # a topic is given up on after this many failed tries (and the time)
_PROBE_SECONDS = 5.0  # while given up on, one event of the topic is tried this often


class SpillDirUnusable(RuntimeError):
    """The spill directory cannot be created, locked or listed (raised at construction)."""


class TopicMissing(KafkaTimeoutError):
    """Kafka answered the producer's metadata requests, but without this topic."""

    retriable = True


@dataclass
class _Missing:
    """A topic Kafka does not have, as far as the sender has seen."""

    since: float  # first failed try
    tries: int = 0
    given_up: bool = False  # its events are dropped (no_topic) until a probe finds it
    probe_at: float = 0.0


@dataclass
class _InFlight:
    """An event handed to the producer, not acknowledged yet."""

    event: SpilledEvent
    sent_at: float
    copy: Position | None = None  # its copy in the journal, made when Kafka stalled


@dataclass
class _Chunk:
    """Journal records handed to the producer together; results[i] is None while waiting,
    then True (acknowledged), _SKIPPED or the exception it failed with."""

    id: int
    records: list[Record]
    sent_at: float
    results: list[Any] = field(default_factory=list)

    def done(self) -> bool:
        return all(r is not None for r in self.results)


class _Warn:
    """A warning logged at most once per `period` seconds, with the count in between."""

    def __init__(self, period: float = 10.0) -> None:
        self._throttle = LogThrottle(period)

    def __call__(self, msg: str, *args: Any, exc_info: BaseException | None = None) -> None:
        held = self._throttle.admit()
        if held is None:
            return
        if held:
            msg, args = msg + " (%d times since the last such warning)", (*args, held + 1)
        log.warning(msg, *args, exc_info=exc_info)


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
        self._bootstrap = bootstrap
        self._client_id = client_id
        self._stall = stall_seconds
        self._abandon_after = max(abandon_seconds, stall_seconds)
        self._missing_after = missing_topic_seconds
        self._chunk_records = chunk_records
        self._sync_every = sync_seconds
        self._queue: queue.Queue[Any] = queue.Queue(max_queue)
        # Only claims the slot: the scan of what it holds runs on the sender thread. A
        # directory that cannot be created, locked or listed fails here, at start-up.
        try:
            self.journal = SpillJournal(spill_dir, spill_max_bytes, load=False)
            os.listdir(self.journal.dir)
        except OSError as exc:
            raise SpillDirUnusable(
                f"spill directory {spill_dir} cannot be used ({exc}): give the server a "
                "writable directory in LORALOOP_SPILL_DIR"
            ) from exc
        self._producer: KafkaProducer | None = None
        self._thread = threading.Thread(target=self._run, name="event-log", daemon=True)
        self._connector: threading.Thread | None = None
        self._connect_started = time.monotonic()
        self._stopping = threading.Event()
        self._stop_taken = False  # the sender took stop()'s marker off the queue
        self._stop_timeout = drain_seconds
        self._stop_deadline: float | None = None  # set by stop(): when the sender must end
        self._load_at = 0.0  # next try of the journal's load, while it fails
        self._load_pause = 0.1
        self._load_tried = False
        # (kind, tag, exception or None) from delivery callbacks on the producer's thread
        self._completions: collections.deque[tuple[str, Any, BaseException | None]] = (
            collections.deque()
        )
        self._inflight: dict[int, _InFlight] = {}  # token -> event, oldest first
        self._inflight_copied = True  # every in-flight event has been offered to the journal
        self._copies = 0  # in-flight events with a copy in the journal
        self._next_token = 0
        self._chunk: _Chunk | None = None
        self._skip: set[Position] = set()  # journal records acknowledged as originals
        self._retry_at = 0.0
        self._failures = 0
        self._missing: dict[str, _Missing] = {}
        self._error_pause = 0.0  # back-off after an unexpected error in the sender
        self._needs_reset = False
        self._last_sync = 0.0
        self._routed = 0
        self.accepted = 0  # queued by publish()
        self.sent = 0  # handed to the producer (from the queue or the journal; retries too)
        self.delivered = 0  # acknowledged by Kafka
        self.spilled = 0  # appended to the journal
        self.drained = 0  # acknowledged by Kafka after a stay in the journal
        self.sender_errors = 0  # unexpected errors the sender thread survived
        self.left_at_stop: int | None = None  # events left in the journal by stop()
        self._dropped = dict.fromkeys(DROP_REASONS, 0)
        self.connected = threading.Event()
        self._warn = {reason: _Warn() for reason in ("spill", "kafka", "sender", *DROP_REASONS)}

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
        self._start_connector()
        self._thread.start()

    # --- the request path ---------------------------------------------------------------
    def publish(
        self, topic: str, key: str, value: bytes | None, timestamp_ms: int | None = None
    ) -> bool:
        """Queue an event (None: a tombstone); False, and counted, when the queue is full.

        `timestamp_ms` becomes the Kafka record's timestamp, kept across a stay in the
        journal (None: Kafka stamps the record when the sender hands it over, which after
        an outage is the drain time)."""
        try:
            self._queue.put_nowait(SpilledEvent(topic, key.encode(), value, timestamp_ms))
        except queue.Full:
            self._dropped["queue_full"] += 1
            self._warn["queue_full"](
                "event queue full (%d): an event for %s dropped", self._queue.maxsize, topic
            )
            return False
        self.accepted += 1
        return True

    # --- state, read by metrics and tests from any thread --------------------------------
    @property
    def depth(self) -> int:
        """Events waiting in the in-memory queue."""
        return self._queue.qsize()

    @property
    def backlog(self) -> int:
        """Events accepted and neither acknowledged by Kafka nor dropped yet."""
        in_producer_only = len(self._inflight) - self._copies
        return self._queue.qsize() + in_producer_only + self.journal.pending - len(self._skip)

    @property
    def dropped_by(self) -> dict[str, int]:
        """Events lost, by reason (see the module's docstring)."""
        return self._dropped | {"journal_torn": self.journal.torn}

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
        return self._producer is None or self.journal.pending > 0 or self._stalled()

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
            self._stop_timeout = timeout
        deadline = time.monotonic() + self._stop_timeout
        self._stop_deadline = deadline
        self._stopping.set()
        # The marker only ends the sender's wait sooner: once stopping, it also ends when
        # it finds the queue empty, so a full queue (or a zero timeout) cannot keep it on.
        with contextlib.suppress(queue.Full):
            self._queue.put(_STOP, timeout=max(0.0, deadline - time.monotonic()))
        # the sender's own deadline is the same; the grace covers closing the producer
        self._thread.join(max(0.0, deadline - time.monotonic()) + _STOP_GRACE)
        if self._connector is not None:
            self._connector.join(5)

    def _settled(self) -> bool:
        accepted = self.accepted
        return (
            (self.journal.loaded.is_set() or self._load_tried)
            and self._routed == accepted
            and not self._inflight
            and self._chunk is None
            and self.journal.pending == 0
        )

    # --- the producer -------------------------------------------------------------------
    def _start_connector(self) -> None:
        if self._connector is not None and self._connector.is_alive():
            return
        self._connect_started = time.monotonic()
        self._connector = threading.Thread(
            target=self._connect, name="event-log-connect", daemon=True
        )
        self._connector.start()

    def _connect(self) -> None:
        """Create a producer (its constructor waits for Kafka), off the sender thread."""
        request_ms = max(1000, int(1000 * self._abandon_after))
        while not self._stopping.is_set():
            try:
                producer = KafkaProducer(
                    bootstrap_servers=self._bootstrap,
                    client_id=self._client_id,
                    acks="all",
                    enable_idempotence=True,
                    linger_ms=5,
                    max_block_ms=_MAX_BLOCK_MS,  # send() waiting for metadata, on our thread
                    # A request is timed out by the producer when we would abandon it.
                    request_timeout_ms=request_ms,
                    delivery_timeout_ms=max(30_000, 3 * request_ms),
                    reconnect_backoff_max_ms=1000,
                    bootstrap_timeout_ms=2000,
                )
            except KafkaError as exc:
                self._warn["kafka"]("Kafka at %s unreachable: %s", self._bootstrap, exc)
                self._stopping.wait(0.5)
                continue
            if self._stopping.is_set():
                producer.close(timeout=1)
                return
            self._producer = producer
            self.connected.set()
            log.info("event log connected to Kafka at %s", self._bootstrap)
            return

    def _abandon(self, why: str) -> None:
        """Give up on the producer: what it holds counts as failed (copies of it are in the
        journal); a new one connects in the background."""
        self._settle()  # results the producer reported before we gave up still count
        producer, self._producer = self._producer, None
        self.connected.clear()
        self._needs_reset = False
        if producer is not None:
            _force_close(producer)
        gone = KafkaTimeoutError(f"producer abandoned: {why}")
        for token, pending in list(self._inflight.items()):
            if pending.copy is None:
                self._failed(pending.event, gone)
            del self._inflight[token]
            self._copies -= pending.copy is not None
        if self._chunk is not None:
            chunk, self._chunk = self._chunk, None
            chunk.results = [gone if r is None else r for r in chunk.results]
            self._finish(chunk)
        self._warn["kafka"]("event log: %s; events spill while a new producer connects", why)
        if not self._stopping.is_set():
            self._start_connector()

    def _on_done(self, tag: tuple[str, Any], exc: BaseException | None) -> None:
        """Delivery callback (on the producer's thread): hand the result to the sender."""
        self._completions.append((tag[0], tag[1], exc))

    # --- the sender thread --------------------------------------------------------------
    def _run(self) -> None:
        self._load_journal()
        while not self._stop_taken:
            try:
                self._turn()
            except Exception as exc:  # never let the thread die: every event would be lost
                self._sender_error(exc)
        try:
            self._shutdown(self._stop_timeout)
        except Exception as exc:
            self._sender_error(exc)
            with contextlib.suppress(Exception):
                self.journal.close()

    def _turn(self) -> None:
        """One turn of the sender loop."""
        self._load_journal()
        self._settle()
        if self._waiting_for_first_connection():
            time.sleep(0.02)
            return
        stopping = self._stopping.is_set()
        items = self._take(timeout=0.02 if self._busy() or stopping else 0.1)
        if stopping and not items:  # stop() began and the queue is empty: no marker needed
            self._stop_taken = True
        for item in items:
            if item is _STOP:
                self._stop_taken = True
                break
            try:
                self._route(item)
            except Exception as exc:  # the event is lost, but counted
                self._dropped["sender_error"] += 1
                self._sender_error(exc)
            finally:
                self._routed += 1
        self._settle()
        self._watch()
        self._drain()
        self._sync(force=False)
        self._error_pause = 0.0

    def _load_journal(self) -> None:
        """Index what a previous process left in the journal (a CRC scan of every record),
        here rather than on the thread that created the event log. A failure is retried
        with a back-off on later turns, while the loop goes on sending straight to Kafka
        (an event that must spill meanwhile fails to and is counted as spill_error)."""
        if self.journal.loaded.is_set() or time.monotonic() < self._load_at:
            return
        try:
            self.journal.load()
        except OSError as exc:
            self.sender_errors += 1
            self._warn["sender"](
                "spill journal %s unreadable (%s); events go straight to Kafka while it is retried",
                self.journal.dir,
                exc,
            )
            self._load_at = time.monotonic() + self._load_pause
            self._load_pause = min(5.0, 2 * self._load_pause)
        finally:
            self._load_tried = True

    def _sender_error(self, exc: BaseException) -> None:
        """Log and count an unexpected error of the sender thread, then back off."""
        self.sender_errors += 1
        self._warn["sender"]("event log sender: unexpected error (it goes on)", exc_info=exc)
        self._error_pause = min(2.0, max(0.05, 2 * self._error_pause))
        time.sleep(self._error_pause)

    def _waiting_for_first_connection(self) -> bool:
        """Right after start, events wait in memory (up to stall_seconds) for the producer."""
        return (
            self._producer is None
            and self.delivered == 0
            and not self._stopping.is_set()
            and time.monotonic() - self._connect_started < self._stall
        )

    def _busy(self) -> bool:
        return bool(self._inflight or self._chunk or self._completions)

    def _take(self, timeout: float) -> list[Any]:
        try:
            items = [self._queue.get(timeout=timeout)]
        except queue.Empty:
            return []
        with contextlib.suppress(queue.Empty):
            while len(items) < _TAKE and items[-1] is not _STOP:
                items.append(self._queue.get_nowait())
        return items

    def _oldest_outstanding(self) -> float | None:
        """When the oldest event still waiting for Kafka's acknowledgement was sent."""
        try:
            oldest = next(iter(self._inflight.values())).sent_at
        except (StopIteration, RuntimeError):  # RuntimeError: changed by the sender thread
            oldest = None
        chunk = self._chunk
        if chunk is not None and (oldest is None or chunk.sent_at < oldest):
            oldest = chunk.sent_at
        return oldest

    def _stalled(self) -> bool:
        """Kafka has not acknowledged an outstanding event for stall_seconds."""
        oldest = self._oldest_outstanding()
        return oldest is not None and time.monotonic() - oldest > self._stall

    def _route(self, event: SpilledEvent) -> None:
        if (
            self._producer is None
            or self._needs_reset
            or self.journal.pending > 0
            or self._chunk is not None
            or self._stalled()
        ):
            self._copy_inflight()  # older events first: the journal keeps their order
            self._spill(event)
        elif self._given_up(event.topic):
            self._drop_no_topic(event)
        else:
            self._send(event)

    def _send(self, event: SpilledEvent) -> None:
        assert self._producer is not None
        token = self._next_token
        self._next_token += 1
        self._inflight[token] = _InFlight(event, time.monotonic())
        self._inflight_copied = False
        try:
            future = self._producer.send(
                event.topic, key=event.key, value=event.value, timestamp_ms=event.timestamp_ms
            )
        except Exception as exc:  # no metadata within max_block_ms, a closed producer, ...
            del self._inflight[token]
            exc = self._classify(event.topic, exc)
            if isinstance(exc, TopicMissing):
                self._note_missing(event.topic)
                if self._given_up(event.topic, probing=True):
                    self._drop_no_topic(event)
                    return
            self._failed(event, exc)
            return
        self.sent += 1
        tag = ("direct", token)
        future.add_callback(lambda _meta, tag=tag: self._on_done(tag, None))
        future.add_errback(lambda exc, tag=tag: self._on_done(tag, exc))

    def _spill(self, event: SpilledEvent, count_drop: bool = True) -> Position | None:
        """Append to the journal; None (and, if `count_drop`, a counted drop) if it failed."""
        try:
            position = self.journal.append(event)
        except OSError as exc:
            if count_drop:
                self._dropped["spill_error"] += 1
            self._warn["spill_error"]("spill journal write failed (%s): event dropped", exc)
            return None
        if position is None:
            if count_drop:
                self._dropped["spill_full"] += 1
            self._warn["spill_full"](
                "spill journal full (%d of %d bytes): an event for %s dropped",
                self.journal.bytes,
                self.journal.max_bytes,
                event.topic,
            )
            return None
        self.spilled += 1
        self._warn["spill"]("Kafka unreachable or behind: events spill to %s", self.journal.dir)
        return position

    # --- topics Kafka does not have ----------------------------------------------------
    def _classify(self, topic: str, exc: BaseException) -> BaseException:
        """`exc` from send(), as TopicMissing when the broker did answer, without `topic`:
        its metadata is fresher than the time send() waited for the topic's."""
        if not isinstance(exc, KafkaTimeoutError) or self._producer is None:
            return exc
        try:
            age = self._producer.metrics()["producer-metrics"]["metadata-age"]
        except Exception:
            return exc
        if 0 <= age < 2 * _MAX_BLOCK_MS / 1000:
            return TopicMissing(f"Kafka has no topic {topic!r} (metadata {age:.1f} s old)")
        return exc

    def _note_missing(self, topic: str) -> None:
        """One more failed try (a direct send or a journal chunk) for a missing topic."""
        now = time.monotonic()
        missing = self._missing.setdefault(topic, _Missing(now))
        missing.tries += 1
        if missing.given_up:
            missing.probe_at = now + _PROBE_SECONDS
        elif missing.tries >= _MISSING_TRIES and now - missing.since >= self._missing_after:
            missing.given_up = True
            missing.probe_at = now + _PROBE_SECONDS
            log.error(
                "Kafka has no topic %r (tried %d times over %.0f s): its events are dropped "
                "and counted (no_topic) until it exists",
                topic,
                missing.tries,
                now - missing.since,
            )

    def _given_up(self, topic: str, probing: bool = False) -> bool:
        """Whether events for `topic` are dropped now: it is missing and given up on, and
        (unless `probing`: the try was just made) no probe is due."""
        missing = self._missing.get(topic)
        if missing is None or not missing.given_up:
            return False
        return probing or time.monotonic() < missing.probe_at

    def _found(self, topic: str) -> None:
        """Kafka acknowledged an event for `topic`: it exists."""
        if self._missing and self._missing.pop(topic, None) is not None:
            log.info("Kafka has topic %r now: its events are delivered again", topic)

    def _drop_no_topic(self, event: SpilledEvent) -> None:
        self._dropped["no_topic"] += 1
        self._warn["no_topic"]("Kafka has no topic %r: an event for it dropped", event.topic)

    def _failed(self, event: SpilledEvent, exc: BaseException) -> None:
        """An event Kafka did not take: into the journal, unless it can never go."""
        if isinstance(exc, _PERMANENT):
            self._dropped["rejected"] += 1
            self._warn["rejected"]("Kafka rejected an event for %s for good: %s", event.topic, exc)
            return
        if isinstance(exc, IllegalStateError) or not getattr(exc, "retriable", True):
            self._needs_reset = True  # e.g. a fatal idempotence error: use a new producer
        self._spill(event)

    def _copy_inflight(self) -> None:
        """Copy the events waiting in the producer to the journal (once each). A copy that
        does not fit is not a drop yet: the original may still be delivered."""
        if self._inflight_copied:
            return
        for pending in list(self._inflight.values()):
            if pending.copy is None:
                pending.copy = self._spill(pending.event, count_drop=False)
                self._copies += pending.copy is not None
        self._inflight_copied = True

    def _watch(self) -> None:
        """Copy to the journal when Kafka stalls; abandon the producer when it is gone."""
        oldest = self._oldest_outstanding()
        waited = 0.0 if oldest is None else time.monotonic() - oldest
        if waited > self._stall:
            self._copy_inflight()
        if self._producer is not None and waited > self._abandon_after:
            self._abandon(f"no acknowledgement from Kafka for {waited:.1f} s")
        elif self._needs_reset and not self._inflight and self._chunk is None:
            self._abandon("the producer failed fatally")

    def _settle(self) -> None:
        """Apply the delivery results the producer's thread reported."""
        while self._completions:
            kind, tag, exc = self._completions.popleft()
            if kind == "chunk":
                chunk_id, index = tag
                if self._chunk is not None and self._chunk.id == chunk_id:
                    self._chunk.results[index] = True if exc is None else exc
                continue
            pending = self._inflight.get(tag)
            if pending is None:  # given up on when the producer was abandoned
                continue
            if exc is None:
                self.delivered += 1
                self._found(pending.event.topic)
                if pending.copy is not None:
                    self._skip.add(pending.copy)  # delivered: its copy is not sent again
            elif pending.copy is None:
                self._failed(pending.event, exc)
            elif isinstance(exc, _PERMANENT):  # its copy would fail the same way
                self._skip.add(pending.copy)
                self._failed(pending.event, exc)
            del self._inflight[tag]  # after the journal has it: flush() never sees a gap
            self._copies -= pending.copy is not None

    def _drain(self) -> None:
        """Finish the current chunk of the journal, or hand the next one to the producer."""
        chunk = self._chunk
        if chunk is not None:
            if not chunk.done():
                return
            self._chunk = None
            self._finish(chunk)
        if (
            self._producer is None
            or self._needs_reset
            or self._inflight
            or self.journal.pending == 0
            or time.monotonic() < self._retry_at
        ):
            return
        try:
            records = self.journal.read(self._chunk_records)
        except OSError as exc:
            self._warn["spill_error"]("spill journal read failed (%s); retrying", exc)
            self._failures += 1
            self._retry_at = time.monotonic() + min(5.0, 0.25 * 2**self._failures)
            return
        if not records:
            return
        chunk = _Chunk(self._next_token, records, time.monotonic(), [None] * len(records))
        self._next_token += 1
        self._chunk = chunk
        missing: dict[str, BaseException] = {}  # topics found missing in this chunk
        for i, (position, event) in enumerate(records):
            if position in self._skip:
                chunk.results[i] = _SKIPPED
                continue
            if event.topic in missing:  # tried once per chunk: send() blocks on it
                chunk.results[i] = missing[event.topic]
                continue
            if self._given_up(event.topic):
                chunk.results[i] = _NO_TOPIC
                continue
            try:
                future = self._producer.send(
                    event.topic,
                    key=event.key,
                    value=event.value,
                    timestamp_ms=event.timestamp_ms,
                )
            except Exception as exc:
                exc = self._classify(event.topic, exc)
                if isinstance(exc, TopicMissing):  # Kafka answers: go on with other topics
                    self._note_missing(event.topic)
                    given_up = self._given_up(event.topic, probing=True)
                    missing[event.topic] = _NO_TOPIC if given_up else exc
                    chunk.results[i] = missing[event.topic]
                    continue
                chunk.results[i:] = [exc if r is None else r for r in chunk.results[i:]]
                break
            self.sent += 1
            tag = ("chunk", (chunk.id, i))
            future.add_callback(lambda _meta, tag=tag: self._on_done(tag, None))
            future.add_errback(lambda exc, tag=tag: self._on_done(tag, exc))

    def _finish(self, chunk: _Chunk) -> None:
        """Commit the chunk's acknowledged prefix; the rest is read again after a pause."""
        commit: Position | None = None
        failures: list[BaseException] = []
        for (position, event), result in zip(chunk.records, chunk.results, strict=True):
            if result is True:
                self.delivered += 1
                self.drained += 1
                self._found(event.topic)
            elif result is _NO_TOPIC:
                self._drop_no_topic(event)  # given up on: done with it
            elif isinstance(result, _PERMANENT):
                self._failed(event, result)  # counted as rejected: done with it
            elif isinstance(result, BaseException):
                failures.append(result)
                continue
            if failures:
                self._skip.add(position)  # done, behind a failure: skipped when read again
            else:
                commit = position
        if commit is not None:
            self.journal.commit(commit)  # file errors are its own to log and count
            self._skip = {p for p in self._skip if p > commit}
        if not failures:
            self._failures = 0
            return
        self.journal.rewind()
        self._failures += 1
        self._retry_at = time.monotonic() + min(5.0, 0.25 * 2**self._failures)
        if any(isinstance(e, IllegalStateError) or not _retriable(e) for e in failures):
            self._needs_reset = True
        self._warn["kafka"](
            "%d of %d spilled events not delivered (%s); retrying",
            len(failures),
            len(chunk.records),
            failures[0],
        )

    def _sync(self, force: bool) -> None:
        now = time.monotonic()
        if force or now - self._last_sync >= self._sync_every:
            try:
                self.journal.sync()
            except OSError as exc:
                self._warn["spill_error"]("spill journal fsync failed: %s", exc)
            self._last_sync = now

    def _shutdown(self, timeout: float) -> None:
        """Deliver what Kafka takes within `timeout` (and before stop()'s deadline); leave
        the rest in the journal; close."""
        deadline = time.monotonic() + timeout
        if self._stop_deadline is not None:
            deadline = min(deadline, self._stop_deadline)
        with contextlib.suppress(queue.Empty):
            while True:  # published after stop() began
                item = self._queue.get_nowait()
                if item is not _STOP:
                    try:
                        self._route(item)
                    except Exception as exc:
                        self._dropped["sender_error"] += 1
                        self._sender_error(exc)
                    finally:
                        self._routed += 1
        while time.monotonic() < deadline:
            self._settle()
            self._watch()  # abandons a producer that no longer answers: then we stop
            self._drain()
            if self._producer is None or self._retry_at > deadline:
                break  # Kafka is not answering: what is left stays in the journal
            if not self._inflight and self._chunk is None and self.journal.pending == 0:
                break
            time.sleep(0.01)  # a chunk Kafka failed is retried after its back-off
        self._settle()
        self._inflight_copied = False
        self._copy_inflight()  # not acknowledged yet: the next start sends it (again)
        self._sync(force=True)
        producer, self._producer = self._producer, None
        if producer is not None:
            if self._inflight or self._chunk is not None:
                _force_close(producer)
            else:
                with contextlib.suppress(Exception):
                    producer.close(timeout=2)
        self.left_at_stop = left = self.journal.pending
        if left:
            log.warning(
                "event log stopped with %d events in the spill journal %s (Kafka %s); the "
                "next start on this directory delivers them",
                left,
                self.journal.dir,
                "did not answer" if time.monotonic() < deadline else "too slow to finish",
            )
        self.journal.close()


def _retriable(exc: BaseException) -> bool:
    return bool(getattr(exc, "retriable", True))
