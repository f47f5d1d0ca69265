"""Read topics from their beginning to the end they had when reading started."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

from kafka import KafkaConsumer, TopicPartition


def read_to_end(bootstrap: str, topics: list[str], timeout: float = 30.0) -> Iterator[Any]:
    """Yield every record of `topics` (all partitions, no consumer group), partition by
    partition in offset order; TimeoutError when the end is not reached in `timeout` s."""
    consumer = KafkaConsumer(bootstrap_servers=bootstrap, group_id=None, enable_auto_commit=False)
    try:
        parts = [
            TopicPartition(topic, p)
            for topic in topics
            for p in sorted(consumer.partitions_for_topic(topic) or ())
        ]
        if not parts:
            return
        consumer.assign(parts)
        consumer.seek_to_beginning(*parts)
        ends = consumer.end_offsets(parts)
        deadline = time.monotonic() + timeout
        while any(consumer.position(tp) < end for tp, end in ends.items()):
            if time.monotonic() > deadline:
                raise TimeoutError(f"could not read {topics} to their end in {timeout:.0f} s")
            for batch in consumer.poll(timeout_ms=200).values():
                yield from batch
    finally:
        consumer.close()
