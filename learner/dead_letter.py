"""The dead-letter topic: where the learner puts records it cannot use, and says why.

A record that does not decode, or decodes into an event the learner cannot learn from
(loraloop/core/event_checks.py), is skipped so it never stops the loop; it is also copied, key and
value unchanged, to `Settings.topic_dead_letter` with headers naming where it came from
and what was wrong, so an operator can find the producer at fault and replay the record
once it is fixed. The copy is sent before the source offset is committed (the learner
flushes its producer first), so it is at-least-once: after a crash the same record can be
forwarded twice, and the source headers identify the duplicates.
"""

from __future__ import annotations

import logging
from typing import Any

from kafka import KafkaProducer
from kafka.errors import KafkaError

log = logging.getLogger(__name__)

HEADER_TOPIC = "loraloop.source.topic"
HEADER_PARTITION = "loraloop.source.partition"
HEADER_OFFSET = "loraloop.source.offset"
HEADER_TIMESTAMP = "loraloop.source.timestamp"
HEADER_ERROR = "loraloop.error"
HEADER_GROUP = "loraloop.consumer.group"
HEADER_OMITTED = "loraloop.value.omitted"  # the value was too big to forward: its size
MAX_ERROR_CHARS = 1000


def dead_letter_headers(record: Any, error: str, group_id: str) -> list[tuple[str, bytes]]:
    """Headers of a record's copy on the dead-letter topic (UTF-8 text values)."""
    values = {
        HEADER_TOPIC: record.topic,
        HEADER_PARTITION: str(record.partition),
        HEADER_OFFSET: str(record.offset),
        HEADER_TIMESTAMP: str(record.timestamp or 0),
        HEADER_ERROR: error[:MAX_ERROR_CHARS],
        HEADER_GROUP: group_id,
    }
    return [(k, v.encode()) for k, v in values.items()]


def header_values(headers: Any) -> dict[str, str]:
    """The headers of a consumed dead-letter record as a dict of text."""
    return {k: (v or b"").decode(errors="replace") for k, v in headers or []}


class DeadLetter:
    """Forwards unusable records to `topic`; counts in `stats` (the learner's) what it
    sent ("dead_lettered") and what failed ("dead_letter_failed")."""

    def __init__(self, topic: str, group_id: str, stats: dict[str, int]) -> None:
        self.topic = topic
        self.group_id = group_id
        self.stats = stats
        stats.setdefault("dead_lettered", 0)
        stats.setdefault("dead_letter_failed", 0)

    def forward(self, producer: KafkaProducer | None, record: Any, error: str) -> None:
        """Send a copy of `record`; a failure is logged and counted, never raised (the
        record stays in its source topic either way)."""
        if producer is None:
            return
        headers = dead_letter_headers(record, error, self.group_id)
        value = record.value
        try:
            try:
                future = producer.send(self.topic, key=record.key, value=value, headers=headers)
            except KafkaError:  # e.g. too large with the headers added: forward without it
                size = str(len(value or b"")).encode()
                future = producer.send(
                    self.topic,
                    key=record.key,
                    value=None,
                    headers=[*headers, (HEADER_OMITTED, size)],
                )
        except KafkaError as exc:
            self.stats["dead_letter_failed"] += 1
            log.warning("could not dead-letter %s:%d@%d: %s", *_where(record), exc)
            return
        future.add_errback(self._lost, record)
        self.stats["dead_lettered"] += 1

    def _lost(self, record: Any, exc: BaseException) -> None:
        """Called from the producer's thread when the broker did not take the copy."""
        self.stats["dead_letter_failed"] += 1
        self.stats["dead_lettered"] -= 1
        log.warning("dead-letter copy of %s:%d@%d was not acknowledged: %s", *_where(record), exc)


def _where(record: Any) -> tuple[str, int, int]:
    return record.topic, record.partition, record.offset
