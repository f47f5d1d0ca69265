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
  at the start of the learner's next round, before anything new, together with any later
  record of the same topic and key that was acknowledged meanwhile, so the newest record
  of a key on a compacted topic is still the newest one the learner meant;
- acknowledged records run their `on_ack` (with the record's metadata: partition, offset).

The learner commits offsets only after a `settle` that returns True. If it dies first,
its replay skips the applied samples and announces their version again.
"""

from __future__ import annotations

import logging
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

    def __init__(self, producer: KafkaProducer | None, stats: dict[str, int]) -> None:
        self.producer = producer
        self.stats = stats
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
        refused, self._refused = self._refused, []
        for msg in refused:
            log.info("sending %s again (try %d)", msg.what, msg.tries + 1)
            self.send(msg)

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
        return not self._sent and not self._refused

    def _failed(self, msg: Outgoing, exc: Any) -> None:
        self.stats["publish_failed"] += 1
        log.warning("Kafka refused %s (try %d): %s; sent again later", msg.what, msg.tries, exc)
