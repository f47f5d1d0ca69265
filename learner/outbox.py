"""What the learner publishes (AdapterUpdated, tombstones, bandit statistics) and whether
Kafka took it.

kafka-python's `flush()` only logs a record the broker refused, and raises
KafkaTimeoutError when records are still in flight at its timeout. The learner must not
commit offsets past samples whose announcement never reached the topic (the version would
never be announced), so every send goes through an `Outbox`, which keeps its future:

- `settle(timeout)` flushes and reports whether everything sent so far is acknowledged;
  a flush timeout is counted and logged, never raised (the records stay in flight and are
  checked again next time);
- a refused record (its future failed, or `send` itself raised) is sent again by `retry()`
  at the start of a later round (backing off from 0.5 s to 10 s between tries), before
  anything new, together with any later record of the same topic and key that was
  acknowledged meanwhile, and a new record of a key with one waiting to be sent again
  queues behind it: the newest record of a key on a compacted topic is still the newest
  one the learner meant. Records keep the order the learner made them in (`seq`): an
  acknowledged record is settled only once no older record of its key is still in flight
  (if that one is refused, the newer one is sent again after it), and `retry()` waits
  while anything is still in flight on the old producer, so no resend can overtake a
  record of its key that was sent before it;
- before sending again it replaces the producer: kafka-python's idempotent producer
  treats a refused batch (MessageSizeTooLarge, for instance) as fatal and aborts every
  later batch, so the old one would refuse everything forever. The old one is
  force-closed (loraloop/core/kafka/producers.py): its I/O thread must not linger and deliver
  anything later;
- acknowledged records run their `on_ack` (with the record's metadata: partition, offset).

The learner commits offsets only after a `settle` that returns True. If it dies first,
its replay skips the applied samples and announces their version again.
"""

from __future__ import annotations

import itertools
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from kafka import KafkaProducer
from kafka.errors import KafkaError, KafkaTimeoutError

from loraloop.core.kafka.producers import force_close

log = logging.getLogger(__name__)


@dataclass
class Outgoing:
    topic: str
    key: bytes
    value: bytes | None
    what: str  # for logs: "AdapterUpdated ann v3", "tombstone ann", ...
    headers: list[tuple[str, bytes]] = field(default_factory=list)
    timestamp_ms: int | None = None
    on_ack: Callable[[Any], None] | None = None
    tries: int = 0
    dropped: bool = False  # its user was deleted since: no re-send, no on_ack
    seq: int = -1  # the order the learner made it in (set by its first `send`)


class Outbox:
    """Sends through `producer`; counts in `stats` (the learner's) "publish_failed" (records
    refused, each try) and "publish_timeouts" (flushes that timed out)."""

    def __init__(self, connect: Callable[[], KafkaProducer] | None, stats: dict[str, int]) -> None:
        self._connect = connect
        self.producer = connect() if connect is not None else None
        self.stats = stats
        self._backoff = 0.0
        self._next_retry = 0.0
        stats.setdefault("publish_failed", 0)
        stats.setdefault("publish_timeouts", 0)
        self._sent: list[tuple[Outgoing, Any]] = []  # in send order, future None: refused
        self._refused: list[Outgoing] = []  # to send again, in their original order (seq)
        self._seq = itertools.count()

    @property
    def unsettled(self) -> int:
        """Records sent or to send again that Kafka has not acknowledged yet."""
        return len(self._sent) + len(self._refused)

    def send(self, msg: Outgoing) -> None:
        if self.producer is None:
            return
        if msg.seq < 0:
            msg.seq = next(self._seq)
        if any(m.key == msg.key and m.topic == msg.topic for m in self._refused):
            self._refused.append(msg)  # behind the one of its key waiting to go again
            return
        msg.tries += 1
        try:
            future = self.producer.send(
                msg.topic,
                key=msg.key,
                value=msg.value,
                headers=msg.headers or None,
                timestamp_ms=msg.timestamp_ms,
            )
        except KafkaError as exc:  # e.g. no metadata within max_block_ms, buffer full
            self._failed(msg, exc)
            future = None
        self._sent.append((msg, future))

    def retry(self) -> None:
        """Send again, in order, what Kafka refused before."""
        if not self._refused or time.monotonic() < self._next_retry:
            return
        if self._in_flight():
            # Replacing the producer would abandon these records, which may still land
            # after a resend of an older record of their key: wait until they are done.
            log.info("%d records still in flight: sending again later", self._in_flight())
            return
        self._collect()  # what completed since the last settle, so the order is known
        self._backoff = min(10.0, max(0.5, self._backoff * 2))
        self._next_retry = time.monotonic() + self._backoff
        if not self._renew():
            return
        refused, self._refused = self._refused, []
        for msg in refused:
            log.info("sending %s again (try %d)", msg.what, msg.tries + 1)
            self.send(msg)

    def _renew(self) -> bool:
        """A fresh producer in place of one that refused records; False: none could be
        made (the records wait for the next try)."""
        if self._connect is None or self.producer is None:
            return False
        try:
            fresh = self._connect()
        except KafkaError as exc:
            log.warning("could not start a new Kafka producer (%s); will try again", exc)
            return False
        old, self.producer = self.producer, fresh
        try:
            force_close(old)
        except Exception as exc:  # a broken producer may fail to close
            log.warning("closing the old Kafka producer failed: %s", exc)
        return True

    def _in_flight(self) -> int:
        return sum(1 for _, f in self._sent if f is not None and not f.is_done)

    def forget(self, key: bytes) -> None:
        """A deleted user: never send their refused records again (tombstones excepted),
        and let no acknowledgement of theirs still in flight report back."""
        self._refused = [m for m in self._refused if m.key != key or m.value is None]
        for msg, _ in self._sent:
            if msg.key == key and msg.value is not None:
                msg.dropped = True

    def settle(self, timeout: float) -> bool:
        """Flush; True when every record sent so far is acknowledged."""
        if self.producer is None:
            return True
        if self._sent:
            try:
                self.producer.flush(timeout=timeout)
            except KafkaTimeoutError as exc:
                self.stats["publish_timeouts"] += 1
                log.warning(
                    "Kafka did not acknowledge %d records within %.1f s (%s): offsets are not "
                    "committed until it does",
                    sum(1 for _, f in self._sent if f is not None and not f.is_done),
                    timeout,
                    exc,
                )
        self._collect()
        if not self._refused:
            self._backoff = 0.0
        return not self._sent and not self._refused

    def _collect(self) -> None:
        """Sort the completed sends into refused (to send again) and acknowledged ones; an
        acknowledged record waits while an older one of its key is still in flight, and
        goes again after an older one of its key that was refused."""
        waiting: list[tuple[Outgoing, Any]] = []
        acked: list[tuple[Outgoing, Any]] = []
        for msg, future in self._sent:
            if future is not None and not future.is_done:
                waiting.append((msg, future))  # still in flight: look again next time
            elif future is None or future.failed():
                if future is not None:
                    self._failed(msg, future.exception)
                if not msg.dropped:
                    self._refused.append(msg)
            else:
                acked.append((msg, future))
        oldest_refused: dict[tuple[str, bytes], int] = {}
        for msg in self._refused:
            key = (msg.topic, msg.key)
            oldest_refused[key] = min(msg.seq, oldest_refused.get(key, msg.seq))
        oldest_flying: dict[tuple[str, bytes], int] = {}
        for msg, _ in waiting:
            key = (msg.topic, msg.key)
            oldest_flying[key] = min(msg.seq, oldest_flying.get(key, msg.seq))
        for msg, future in acked:
            key = (msg.topic, msg.key)
            if oldest_flying.get(key, msg.seq) < msg.seq:
                waiting.append((msg, future))  # the older one may still be refused
                continue
            if msg.dropped:
                continue
            if msg.on_ack is not None:
                msg.on_ack(future.value)
            if oldest_refused.get(key, msg.seq) < msg.seq:  # newer than a refused one
                self._refused.append(msg)
        self._refused.sort(key=lambda m: m.seq)  # stable: resends of one record keep order
        self._sent = waiting

    def _failed(self, msg: Outgoing, exc: Any) -> None:
        self.stats["publish_failed"] += 1
        log.warning("Kafka refused %s (try %d): %s; sent again later", msg.what, msg.tries, exc)
