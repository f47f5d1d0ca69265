"""The learner against the real broker: start-up errors, malformed input, replay safety."""

from __future__ import annotations

import socket
import time
from pathlib import Path

import pytest
from kafka import KafkaProducer

from loraloop.core.adapters.store import AdapterStore
from loraloop.core.gen.loraloop.v1 import common_pb2, events_pb2
from loraloop.learner.loop import KafkaUnavailableError, Learner
from tests.support import isolated_settings

pytestmark = pytest.mark.kafka


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_learner_without_kafka_fails_clearly(tmp_path: Path) -> None:
    settings = isolated_settings(f"127.0.0.1:{_free_port()}", tmp_path, kafka_connect_timeout=2)
    learner = Learner(settings, max_users_per_step=2)
    started = time.monotonic()
    with pytest.raises(KafkaUnavailableError, match="loraloop kafka"):
        learner.connect()
    assert time.monotonic() - started < 30


def _events(user: str, request_id: str, thumbs: int) -> tuple[bytes, bytes]:
    interaction = events_pb2.Interaction(
        request_id=request_id,
        user_id=user,
        prompt_token_ids=[1, 40, 41, 42],
        response_token_ids=[50, 51, 52, 2],
        behaviour_logprobs=[-1.0] * 4,
        adapter_version=0,
    )
    feedback = events_pb2.FeedbackEvent(
        request_id=request_id, user_id=user, signals=common_pb2.FeedbackSignals(thumbs=thumbs)
    )
    return interaction.SerializeToString(), feedback.SerializeToString()


def _drain(learner: Learner, rounds: int = 15) -> None:
    assert learner.consumer is not None
    for _ in range(rounds):
        polled = learner.consumer.poll(timeout_ms=300)
        learner.process([r for batch in polled.values() for r in batch])


def test_malformed_events_are_skipped_and_replay_applies_nothing_twice(
    kafka_bootstrap: str, tmp_path: Path
) -> None:
    settings = isolated_settings(kafka_bootstrap, tmp_path)
    learner = Learner(settings, max_users_per_step=4)
    learner.connect()
    producer = KafkaProducer(bootstrap_servers=kafka_bootstrap)
    producer.send(settings.topic_interactions, key=b"ann", value=b"\xff not protobuf")
    for user, rid, thumbs in (("ann", "r1", 1), ("ben", "r2", -1)):
        interaction, feedback = _events(user, rid, thumbs)
        producer.send(settings.topic_feedback, key=user.encode(), value=feedback)  # reordered
        producer.send(settings.topic_interactions, key=user.encode(), value=interaction)
    producer.send(settings.topic_feedback, key=b"ann", value=_events("ann", "r1", 1)[1])  # dup
    producer.flush()
    _drain(learner)
    store = AdapterStore(settings.adapter_store)
    assert store.versions("ann") == [1] and store.versions("ben") == [1]
    assert learner.stats["malformed"] == 1
    assert learner.joiner.duplicates == 1
    learner.close()

    # A second learner in a fresh group replays the whole topics: nothing applied twice.
    replay = Learner(
        settings.model_copy(update={"group_id": settings.group_id + "-replay"}),
        max_users_per_step=4,
    )
    replay.connect()
    _drain(replay)
    assert store.versions("ann") == [1] and store.versions("ben") == [1]
    assert replay.stats["skipped_applied"] == 2 and replay.stats["versions"] == 0
    replay.close()


def test_committed_offsets_resume_where_the_learner_stopped(
    kafka_bootstrap: str, tmp_path: Path
) -> None:
    settings = isolated_settings(kafka_bootstrap, tmp_path)
    producer = KafkaProducer(bootstrap_servers=kafka_bootstrap)
    interaction, feedback = _events("cat", "r1", 1)
    producer.send(settings.topic_interactions, key=b"cat", value=interaction)
    producer.flush()
    first = Learner(settings, max_users_per_step=2)
    first.connect()
    _drain(first, rounds=8)  # the interaction waits for its feedback: offset not committed
    first.close()
    producer.send(settings.topic_feedback, key=b"cat", value=feedback)
    producer.flush()
    second = Learner(settings, max_users_per_step=2)  # same group: resumes from commits
    second.connect()
    _drain(second)
    assert AdapterStore(settings.adapter_store).versions("cat") == [1]
    second.close()


def test_tombstone_deletes_the_users_adapters(kafka_bootstrap: str, tmp_path: Path) -> None:
    settings = isolated_settings(kafka_bootstrap, tmp_path)
    learner = Learner(settings, max_users_per_step=2)
    learner.connect()
    producer = KafkaProducer(bootstrap_servers=kafka_bootstrap)
    interaction, feedback = _events("dan", "r1", 1)
    producer.send(settings.topic_interactions, key=b"dan", value=interaction)
    producer.send(settings.topic_feedback, key=b"dan", value=feedback)
    producer.flush()
    _drain(learner)
    store = AdapterStore(settings.adapter_store)
    assert store.versions("dan") == [1]
    producer.send(settings.topic_adapter_updates, key=b"dan", value=None)
    producer.flush()
    _drain(learner)
    assert store.versions("dan") == [] and not store.user_dir("dan").exists()
    learner.close()


def test_a_slow_restore_read_fails_with_a_clear_error(kafka_bootstrap: str, tmp_path: Path) -> None:
    """Reading the adapter-updates topic to its end at start-up past its timeout stops
    connect() with the learner's clear error, not a bare TimeoutError."""
    settings = isolated_settings(kafka_bootstrap, tmp_path, learner_restore_timeout_seconds=1e-6)
    producer = KafkaProducer(bootstrap_servers=kafka_bootstrap)
    try:
        for i in range(20):
            producer.send(settings.topic_adapter_updates, key=f"u{i}".encode(), value=None)
        producer.flush(timeout=20)
    finally:
        producer.close()
    learner = Learner(settings, max_users_per_step=2)
    try:
        with pytest.raises(KafkaUnavailableError, match="LEARNER_RESTORE_TIMEOUT_SECONDS") as err:
            learner.connect()
    finally:
        learner.close()
    print(f"\nrestore read past its timeout: {err.value}")
