"""Read a compacted topic from its beginning, then follow it: how a server rebuilds its
view of per-user state (adapter versions, bandit statistics) and keeps it current."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

from kafka import KafkaConsumer, TopicPartition
from kafka.errors import KafkaError

log = logging.getLogger(__name__)

# (topic, key, value, the record's timestamp in ms: for a tombstone, when its user was deleted)
OnRecord = Callable[[str, bytes | None, bytes | None, int], None]


class TopicFollower:
    """A daemon thread applying every record of `topics` (all partitions, no consumer
    group) to `on_record`; reconnects while Kafka is away. `caught_up` is set once the
    records that existed at start-up have all been applied."""

    def __init__(self, bootstrap: str, topics: list[str], on_record: OnRecord, name: str):
        self._bootstrap = bootstrap
        self._topics = topics
        self._on_record = on_record
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self.caught_up = threading.Event()
        self.records = 0

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def _run(self) -> None:
        while not self._stop.is_set():
            consumer = None
            try:
                consumer = KafkaConsumer(
                    bootstrap_servers=self._bootstrap,
                    group_id=None,
                    enable_auto_commit=False,
                    client_id=f"loraloop-{self._thread.name}",
                )
                tps = [
                    TopicPartition(topic, p)
                    for topic in self._topics
                    for p in sorted(consumer.partitions_for_topic(topic) or ())
                ]
                if not tps:
                    raise KafkaError(f"topics {self._topics} have no partitions (yet)")
                consumer.assign(tps)
                consumer.seek_to_beginning(*tps)
                ends = consumer.end_offsets(tps)
                self._consume(consumer, ends)
            except KafkaError as exc:
                log.warning("%s unavailable (%s); retrying", self._topics, exc)
                self._stop.wait(2.0)
            finally:
                if consumer is not None:
                    consumer.close()

    def _consume(self, consumer: KafkaConsumer, ends: dict[TopicPartition, int]) -> None:
        while not self._stop.is_set():
            for tp, batch in consumer.poll(timeout_ms=200).items():
                for record in batch:
                    try:
                        self._on_record(
                            tp.topic, record.key, record.value, int(record.timestamp or 0)
                        )
                    except Exception:  # one bad record must not stop the view
                        log.exception("record %s@%d skipped", tp, record.offset)
                    self.records += 1
            if not self.caught_up.is_set() and all(
                consumer.position(tp) >= end for tp, end in ends.items()
            ):
                self.caught_up.set()
