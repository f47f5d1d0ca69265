"""Topics Kafka does not have (the broker answers metadata requests, but without the topic).

Such a topic would block the journal, which is drained in order, for every topic behind
it: its events are retried for `missing_topic_seconds` (at least three tries), then
dropped and counted as `no_topic`; while it stays missing, new events for it are dropped at
once, and one is tried again every few seconds to find out whether it was created."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Literal

from kafka import KafkaProducer
from kafka.errors import KafkaTimeoutError

from loraloop.service.event_inflight import Outcome
from loraloop.service.event_producer import MAX_BLOCK_MS
from loraloop.service.event_stats import EventStats, log
from loraloop.service.spill_journal import SpilledEvent

__all__ = ["MissingTopics", "TopicMissing"]

_MISSING_TRIES = 3  # a topic is given up on after this many failed tries (and the time)
_PROBE_SECONDS = 5.0  # while given up on, one event of the topic is tried this often


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


class MissingTopics:
    """The topics found missing, each with its tries and whether it is given up on."""

    def __init__(self, missing_topic_seconds: float, stats: EventStats) -> None:
        self._after = missing_topic_seconds
        self._stats = stats
        self._topics: dict[str, _Missing] = {}

    def send_failed(
        self, producer: KafkaProducer | None, topic: str, exc: BaseException
    ) -> BaseException | Literal[Outcome.NO_TOPIC]:
        """What send() raising `exc` for `topic` means: TopicMissing when the broker did
        answer without it (one more try noted), Outcome.NO_TOPIC if that try gave up on it
        (its event is to be dropped), else `exc` itself."""
        exc = _classify(producer, topic, exc)
        if not isinstance(exc, TopicMissing):
            return exc
        self._note(topic)
        return Outcome.NO_TOPIC if self.given_up(topic, probing=True) else exc

    def given_up(self, topic: str, probing: bool = False) -> bool:
        """Whether events for `topic` are dropped now: it is missing and given up on, and
        (unless `probing`: the try was just made) no probe is due."""
        missing = self._topics.get(topic)
        if missing is None or not missing.given_up:
            return False
        return probing or time.monotonic() < missing.probe_at

    def found(self, topic: str) -> None:
        """Kafka acknowledged an event for `topic`: it exists."""
        if self._topics and self._topics.pop(topic, None) is not None:
            log.info("Kafka has topic %r now: its events are delivered again", topic)

    def drop(self, event: SpilledEvent) -> None:
        self._stats.drop("no_topic", "Kafka has no topic %r: an event for it dropped", event.topic)

    def _note(self, topic: str) -> None:
        """One more failed try (a direct send or a journal chunk) for a missing topic."""
        now = time.monotonic()
        missing = self._topics.setdefault(topic, _Missing(now))
        missing.tries += 1
        if missing.given_up:
            missing.probe_at = now + _PROBE_SECONDS
        elif missing.tries >= _MISSING_TRIES and now - missing.since >= self._after:
            missing.given_up = True
            missing.probe_at = now + _PROBE_SECONDS
            log.error(
                "Kafka has no topic %r (tried %d times over %.0f s): its events are dropped "
                "and counted (no_topic) until it exists",
                topic,
                missing.tries,
                now - missing.since,
            )


def _classify(producer: KafkaProducer | None, topic: str, exc: BaseException) -> BaseException:
    """`exc` from send(), as TopicMissing when the broker did answer, without `topic`: its
    metadata is fresher than the time send() waited for the topic's."""
    if not isinstance(exc, KafkaTimeoutError) or producer is None:
        return exc
    try:
        age = producer.metrics()["producer-metrics"]["metadata-age"]
    except Exception:
        return exc
    if 0 <= age < 2 * MAX_BLOCK_MS / 1000:
        return TopicMissing(f"Kafka has no topic {topic!r} (metadata {age:.1f} s old)")
    return exc
