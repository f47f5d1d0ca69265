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
  one the learner meant;
- before sending again it replaces the producer: kafka-python's idempotent producer
  treats a refused batch (MessageSizeTooLarge, for instance) as fatal and aborts every
  later batch, so the old one would refuse everything forever;
- acknowledged records run their `on_ack` (with the record's metadata: partition, offset).

The learner commits offsets only after a `settle` that returns True. If it dies first,
its replay skips the applied samples and announces their version again.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from kafka import KafkaProducer
from kafka.errors import KafkaError, KafkaTimeoutError

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
        self._refused: list[Outgoing] = []  # to send again, in their original order

    @property
    def unsettled(self) -> int:
        """Records sent or to send again that Kafka has not acknowledged yet."""
        return len(self._sent) + len(self._refused)

    def send(self, msg: Outgoing) -> None:
        if self.producer is None:
            return
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
            old.close(timeout=5)
        except Exception as exc:  # a broken producer may fail to close
            log.warning("closing the old Kafka producer failed: %s", exc)
        return True

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
        waiting: list[tuple[Outgoing, Any]] = []
        broken: set[tuple[str, bytes]] = set()  # topic+key with a refused record
        for msg, future in self._sent:
            key = (msg.topic, msg.key)
            if future is not None and not future.is_done:
                waiting.append((msg, future))  # still in flight: look again next time
                continue
            if future is None or future.failed():
                if future is not None:
                    self._failed(msg, future.exception)
                if not msg.dropped:
                    broken.add(key)
                    self._refused.append(msg)
                continue
            if msg.on_ack is not None and not msg.dropped:
                msg.on_ack(future.value)
            if key in broken and not msg.dropped:  # acknowledged after a refused one
                self._refused.append(msg)
        self._sent = waiting
        if not self._refused and not broken:
            self._backoff = 0.0
        return not self._sent and not self._refused

    def _failed(self, msg: Outgoing, exc: Any) -> None:
        self.stats["publish_failed"] += 1
        log.warning("Kafka refused %s (try %d): %s; sent again later", msg.what, msg.tries, exc)
