"""A version announcement Kafka refuses or does not acknowledge in time is never lost.

- Refused: the adapter-updates topic's max.message.bytes is set below an AdapterUpdated's
  size, so the real broker refuses each announcement. The learner writes the version,
  stays up, counts the refusals, sends the announcement again every round and commits no
  offset; once the topic takes it again the version is announced and the offsets commit.
- Not acknowledged in time: a broker of this module's own is frozen (SIGSTOP) while the
  learner publishes, so its flush times out. The learner counts that instead of dying,
  commits nothing, and commits once the broker (SIGCONT) has acknowledged everything.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from kafka import KafkaAdminClient, KafkaConsumer, KafkaProducer, TopicPartition
from kafka.admin import ConfigResource, ConfigResourceType

from loraloop.core.adapters.store import AdapterStore
from loraloop.core.kafka.admin import ensure_loraloop_topics, topic_configs
from loraloop.core.settings import Settings
from loraloop.devtools.kafka_broker import KafkaBroker
from loraloop.learner.loop import Learner
from loraloop.learner.outbox import Outbox, Outgoing
from tests.faults.crash_support import announced_versions
from tests.faults.test_learner_deletions import _send_pair
from tests.support import drain_learner, isolated_settings, own_broker, read_topic

pytestmark = pytest.mark.kafka


def _set_max_message_bytes(bootstrap: str, topic: str, size: int) -> None:
    admin = KafkaAdminClient(bootstrap_servers=bootstrap)
    try:
        admin.alter_configs(
            [ConfigResource(ConfigResourceType.TOPIC, topic, configs={"max.message.bytes": size})]
        )
    finally:
        admin.close()


def _committed(s: Settings) -> dict[str, int | None]:
    """The learner group's committed offset of each partition of the event topics that
    holds records, by "topic:partition"."""
    consumer = KafkaConsumer(
        bootstrap_servers=s.kafka_bootstrap, group_id=s.group_id, enable_auto_commit=False
    )
    try:
        parts = [
            TopicPartition(t, p)
            for t in (s.topic_interactions, s.topic_feedback)
            for p in consumer.partitions_for_topic(t) or ()
        ]
        ends = consumer.end_offsets(parts)
        return {f"{tp.topic}:{tp.partition}": consumer.committed(tp) for tp in parts if ends[tp]}
    finally:
        consumer.close()


def _ends(s: Settings) -> dict[str, int]:
    consumer = KafkaConsumer(bootstrap_servers=s.kafka_bootstrap)
    try:
        parts = [
            TopicPartition(t, p)
            for t in (s.topic_interactions, s.topic_feedback)
            for p in consumer.partitions_for_topic(t) or ()
        ]
        return {
            f"{tp.topic}:{tp.partition}": e for tp, e in consumer.end_offsets(parts).items() if e
        }
    finally:
        consumer.close()


def test_a_refused_announcement_is_sent_again_and_offsets_wait(
    kafka_bootstrap: str, tmp_path: Path
) -> None:
    s = isolated_settings(kafka_bootstrap, tmp_path, min_batch=1)
    ensure_loraloop_topics(s)
    _set_max_message_bytes(kafka_bootstrap, s.topic_adapter_updates, 100)
    assert topic_configs(kafka_bootstrap, s.topic_adapter_updates)["max.message.bytes"] == "100"
    store = AdapterStore(s.adapter_store)
    producer = KafkaProducer(bootstrap_servers=kafka_bootstrap)
    learner = Learner(s, max_users_per_step=2)
    try:
        learner.connect()
        _send_pair(producer, s, "ivy", "r1", int(time.time() * 1000))
        drain_learner(
            learner,
            lambda: store.versions("ivy") == [1] and learner.stats["publish_failed"] >= 3,
            "the version written and its announcement refused a few times",
        )
        refused = learner.stats["publish_failed"]
        assert announced_versions(s) == {}
        committed, ends = _committed(s), _ends(s)
        assert all((committed[k] or 0) < end for k, end in ends.items()), (committed, ends)

        _set_max_message_bytes(kafka_bootstrap, s.topic_adapter_updates, 1_048_588)
        drain_learner(
            learner,
            lambda: announced_versions(s) == {"ivy": 1} and _committed(s) == _ends(s),
            "the announcement to go out and the offsets to commit",
        )
        stats = dict(learner.stats)
    finally:
        learner.close()
        producer.close()
    assert store.versions("ivy") == [1] and stats["versions"] == 1
    print(
        f"\nrefused announcement: {refused} refusals while the topic was too small, no "
        f"offset committed meanwhile; announced and committed once it took it "
        f"({stats['publish_failed']} refusals in all)"
    )


@pytest.fixture(scope="module")
def frozen_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[KafkaBroker]:
    """A broker of this module's own, which the test freezes."""
    with own_broker(tmp_path_factory.mktemp("frozen-kafka")) as kafka:
        try:
            yield kafka
        finally:
            if kafka.pid is not None:
                os.kill(kafka.pid, signal.SIGCONT)  # a frozen broker would not stop


def test_a_flush_timeout_does_not_stop_the_learner(
    frozen_broker: KafkaBroker, tmp_path: Path
) -> None:
    s = isolated_settings(
        frozen_broker.bootstrap, tmp_path, min_batch=1, learner_publish_timeout_seconds=1.0
    )
    ensure_loraloop_topics(s)
    store = AdapterStore(s.adapter_store)
    producer = KafkaProducer(bootstrap_servers=frozen_broker.bootstrap)
    learner = Learner(s, max_users_per_step=2)
    pid = frozen_broker.pid
    assert pid is not None
    try:
        learner.connect()
        _send_pair(producer, s, "joe", "r1", int(time.time() * 1000))
        drain_learner(learner, lambda: _committed(s) == _ends(s), "v1 announced and committed")
        before = _committed(s)
        _send_pair(producer, s, "joe", "r2", int(time.time() * 1000))
        records: list = []
        deadline = time.monotonic() + 30
        events = (s.topic_interactions, s.topic_feedback)
        while sum(r.topic in events for r in records) < 2 and time.monotonic() < deadline:
            polled = learner.consumer.poll(timeout_ms=200)
            records += [r for batch in polled.values() for r in batch]
        assert sum(r.topic in events for r in records) == 2, records
        os.kill(pid, signal.SIGSTOP)
        try:
            frozen = time.monotonic()
            learner.process(records)  # writes v2, publishes, the flush times out
            frozen_s = time.monotonic() - frozen
        finally:
            os.kill(pid, signal.SIGCONT)
        assert learner.stats["publish_timeouts"] == 1, learner.stats
        assert store.versions("joe") == [1, 2]
        assert _committed(s) == before  # nothing committed past the unacknowledged v2
        drain_learner(
            learner,
            lambda: announced_versions(s) == {"joe": 2} and _committed(s) == _ends(s),
            "the announcement acknowledged and the offsets committed",
        )
        stats = dict(learner.stats)
    finally:
        learner.close()
        producer.close()
    assert stats["versions"] == 2 and stats["publish_failed"] == 0, stats
    print(
        f"\nbroker frozen during the flush: the round returned after {frozen_s:.1f} s "
        f"(timeout {s.learner_publish_timeout_seconds:.0f} s) without committing; v2 "
        f"announced and offsets committed after the broker resumed"
    )


def test_a_resend_never_overtakes_a_newer_record_of_its_key(
    kafka_bootstrap: str, tmp_path: Path
) -> None:
    """An older record the client refuses at `send` (too large for the first producer)
    and a newer one of the same key still in flight when the flush times out: the older
    one is sent again only once the newer one is done, and the newer one after it, so the
    newest record of the key on the topic is still the newer one."""
    s = isolated_settings(kafka_bootstrap, tmp_path)
    ensure_loraloop_topics(s, timeout=20)
    topic = s.topic_adapter_updates
    made: list[KafkaProducer] = []

    def connect() -> KafkaProducer:
        # The first producer refuses records over 2 kB itself; its replacements take them.
        limit = {"max_request_size": 2048} if not made else {}
        made.append(
            KafkaProducer(
                bootstrap_servers=kafka_bootstrap, acks="all", enable_idempotence=True, **limit
            )
        )
        return made[-1]

    stats: dict[str, int] = {}
    outbox = Outbox(connect, stats)
    try:
        outbox.send(Outgoing(topic, b"ann", b"old" * 1000, "old"))  # refused by send()
        outbox.send(Outgoing(topic, b"ann", b"new", "new"))
        in_flight_at_flush = not outbox.settle(timeout=0)  # the flush(0) times out
        deadline = time.monotonic() + 30
        while not outbox.settle(timeout=5) and time.monotonic() < deadline:
            outbox.retry()
            time.sleep(0.2)
        assert outbox.unsettled == 0, stats
    finally:
        for producer in made:
            producer.close(timeout=5)
    values = [r.value for r in read_topic(kafka_bootstrap, topic) if r.key == b"ann"]
    assert values[-1] == b"new", values
    assert stats["publish_failed"] >= 1, stats
    print(
        f"\nolder record refused, newer in flight at the flush: {len(values)} records of the "
        f"key written, newest is the newer one; publish_failed={stats['publish_failed']}, "
        f"publish_timeouts={stats['publish_timeouts']}, settled later: {in_flight_at_flush}"
    )
