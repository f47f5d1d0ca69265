"""The real Kafka broker launcher (loraloop.devtools.kafka_broker) against a real KRaft broker."""

from __future__ import annotations

import socket
import time
import uuid
from pathlib import Path

import pytest
from kafka import KafkaAdminClient, KafkaConsumer, KafkaProducer

from loraloop.core.kafka.admin import (
    TOMBSTONE_RETENTION_MS,
    create_topics,
    topic_configs,
    wait_for_kafka,
)
from loraloop.core.settings import Settings
from loraloop.devtools.kafka_broker import KAFKA_VERSION, KafkaBroker, ensure_kafka_jars

pytestmark = pytest.mark.kafka


def _partition_counts(bootstrap: str, topics: list[str]) -> dict[str, int]:
    admin = KafkaAdminClient(bootstrap_servers=bootstrap)
    try:
        return {t["name"]: len(t["partitions"]) for t in admin.describe_topics(topics)}
    finally:
        admin.close()


def _produce(bootstrap: str, topic: str, records: list[tuple[bytes, bytes]]) -> list[int]:
    """Send keyed records with acks=all; return the partition of each."""
    producer = KafkaProducer(bootstrap_servers=bootstrap, acks="all", retries=5)
    try:
        return [producer.send(topic, key=k, value=v).get(timeout=30).partition for k, v in records]
    finally:
        producer.close()


def _consume_all(bootstrap: str, topic: str, expected: int) -> list[tuple[bytes, bytes, int]]:
    """Read `expected` records of `topic` from the beginning (fresh group)."""
    consumer = KafkaConsumer(
        topic,
        bootstrap_servers=bootstrap,
        group_id=f"test-{uuid.uuid4().hex[:8]}",
        auto_offset_reset="earliest",
        enable_auto_commit=False,
        consumer_timeout_ms=20_000,
    )
    out: list[tuple[bytes, bytes, int]] = []
    try:
        for msg in consumer:
            out.append((msg.key, msg.value, msg.partition))
            if len(out) >= expected:
                break
    finally:
        consumer.close()
    return out


def test_broker_runs_on_a_free_loopback_port(kafka_broker: KafkaBroker) -> None:
    host, _, port = kafka_broker.bootstrap.rpartition(":")
    assert host == "127.0.0.1"
    assert int(port) > 0 and int(port) != 9092
    assert kafka_broker.running and kafka_broker.pid is not None
    assert wait_for_kafka(kafka_broker.bootstrap, timeout=10)
    assert kafka_broker.log_path is not None and kafka_broker.log_path.is_file()


def test_loraloop_topics_have_partitions_and_policies(kafka_bootstrap: str) -> None:
    settings = Settings()
    names = [settings.topic_interactions, settings.topic_feedback, settings.topic_adapter_updates]
    counts = _partition_counts(kafka_bootstrap, names)
    assert counts == dict.fromkeys(names, settings.topic_partitions)
    for name in (settings.topic_adapter_updates, settings.topic_bandit_state):
        configs = topic_configs(kafka_bootstrap, name)
        assert configs["cleanup.policy"] == "compact"
        assert configs["delete.retention.ms"] == str(TOMBSTONE_RETENTION_MS)
    for name in (settings.topic_interactions, settings.topic_feedback):
        assert topic_configs(kafka_bootstrap, name)["cleanup.policy"] == "delete"


def test_create_topics_is_idempotent(kafka_bootstrap: str) -> None:
    name = f"idem-{uuid.uuid4().hex[:8]}"
    spec = {name: {"cleanup.policy": "compact", "segment.ms": 60_000}}
    assert create_topics(kafka_bootstrap, spec, partitions=3) == [name]
    assert create_topics(kafka_bootstrap, spec, partitions=3) == []
    assert create_topics(kafka_bootstrap, [name]) == []
    assert _partition_counts(kafka_bootstrap, [name]) == {name: 3}
    assert topic_configs(kafka_bootstrap, name)["segment.ms"] == "60000"


def test_keyed_produce_consume_round_trip(kafka_bootstrap: str) -> None:
    topic = f"roundtrip-{uuid.uuid4().hex[:8]}"
    create_topics(kafka_bootstrap, [topic], partitions=4)
    records = [(b"user-a", b"1"), (b"user-b", b"2"), (b"user-a", b"3")]
    partitions = _produce(kafka_bootstrap, topic, records)
    assert partitions[0] == partitions[2]  # same key, same partition
    got = _consume_all(kafka_bootstrap, topic, expected=3)
    assert sorted((k, v) for k, v, _ in got) == sorted(records)
    user_a = [v for k, v, _ in got if k == b"user-a"]
    assert user_a == [b"1", b"3"]  # per-key order is kept


def test_stop_start_and_crash_keep_data_on_the_same_port(tmp_path: Path) -> None:
    broker = KafkaBroker(data_dir=tmp_path / "kafka", partitions=2)
    try:
        bootstrap = broker.start()
        create_topics(bootstrap, ["durable"], partitions=2)
        _produce(bootstrap, "durable", [(b"k1", b"before-stop")])

        broker.stop()
        assert not broker.running and broker.pid is None
        broker.stop()  # idempotent
        assert (tmp_path / "kafka" / "kafka-logs" / "meta.properties").is_file()

        assert broker.start() == bootstrap  # same port, so clients can reconnect
        _produce(bootstrap, "durable", [(b"k2", b"before-kill")])

        broker.kill()  # crash: no clean shutdown
        assert not broker.running
        assert broker.start() == bootstrap
        got = _consume_all(bootstrap, "durable", expected=2)
        assert sorted(v for _, v, _ in got) == [b"before-kill", b"before-stop"]

        # A new object on the same directory (and port) sees the same cluster.
        broker.stop()
        port = int(bootstrap.rpartition(":")[2])
        with KafkaBroker(data_dir=tmp_path / "kafka", port=port) as again:
            assert again.bootstrap == bootstrap
            assert _partition_counts(bootstrap, ["durable"]) == {"durable": 2}
    finally:
        broker.stop()


def test_temporary_data_dir_is_removed_on_stop() -> None:
    broker = KafkaBroker()
    with broker:
        data_dir = broker.data_dir
        assert data_dir is not None and data_dir.is_dir()
    assert not data_dir.exists()
    assert broker.data_dir is None and not broker.running
    broker.stop()  # idempotent


def test_start_fails_clearly_when_the_port_is_taken() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        port = sock.getsockname()[1]
        broker = KafkaBroker(port=port)
        with pytest.raises(RuntimeError, match="already in use"):
            broker.start(timeout=30)
        assert not broker.running
        broker.stop()


def test_wait_for_kafka_is_false_when_nothing_listens() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    started = time.monotonic()
    assert not wait_for_kafka(f"127.0.0.1:{port}", timeout=0.5)
    assert time.monotonic() - started < 5


def test_ensure_kafka_jars_is_idempotent() -> None:
    libs = ensure_kafka_jars()
    marker = libs.parent / ".complete"
    stamp = marker.stat().st_mtime_ns
    started = time.monotonic()
    assert ensure_kafka_jars() == libs
    assert time.monotonic() - started < 1.0
    assert marker.stat().st_mtime_ns == stamp
    assert (libs / f"kafka_2.13-{KAFKA_VERSION}.jar").is_file()
    assert (libs / f"kafka-clients-{KAFKA_VERSION}.jar").is_file()
