"""Deleted users stay deleted across learner restarts, and the learner's own tombstone is
only an echo, on the real broker with real learners.

- A learner that restarts after a deletion rebuilds the deletion times from the
  tombstones on the compacted adapter-updates topic: pre-deletion interactions it never
  consumed (its predecessor had paused those partitions) and ones that arrive late (a
  request that started before the deletion) do not bring the user back; an interaction
  started after the deletion is learnt from, as from a new user.
- A version announced after the server's tombstone is answered by one learner tombstone,
  marked `loraloop.origin=learner` and stamped with the deletion time; consuming it again
  neither moves the deletion time nor deletes a version learnt after the deletion. A
  deletion with nothing announced after it gets no learner tombstone at all.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from kafka import KafkaProducer, TopicPartition

from loraloop.core.adapters.store import AdapterStore
from loraloop.core.kafka.admin import ensure_loraloop_topics
from loraloop.core.settings import Settings
from loraloop.learner.deletions import DELETED_AT_HEADER, ORIGIN_HEADER
from loraloop.learner.loop import Learner
from tests.support import (
    drain_learner,
    feedback_event,
    interaction_event,
    isolated_settings,
    read_topic,
)

pytestmark = pytest.mark.kafka

GONE, OTHER = "gil", "hal"


def _send_pair(producer: KafkaProducer, s: Settings, user: str, rid: str, ts: int) -> None:
    """An interaction stamped `ts` (its request's start) and its thumbs-up feedback."""
    interaction = interaction_event(user, rid, ts, arm="default")
    feedback = feedback_event(user, rid, ts)
    producer.send(s.topic_interactions, key=user.encode(), value=interaction.SerializeToString())
    producer.send(s.topic_feedback, key=user.encode(), value=feedback.SerializeToString())
    producer.flush()


def _server_tombstone(producer: KafkaProducer, s: Settings, user: str, at_ms: int) -> None:
    """What DeleteUser publishes: a tombstone stamped with the deletion time."""
    producer.send(s.topic_adapter_updates, key=user.encode(), value=None, timestamp_ms=at_ms)
    producer.flush()


def _partitions(learner: Learner, *topics: str) -> list[TopicPartition]:
    assert learner.consumer is not None
    return [tp for tp in learner.consumer.assignment() if tp.topic in topics]


def _learnt(store: AdapterStore, user: str) -> list[str]:
    return [
        rid
        for v in store.versions(user)
        for rid, _ in store.learner_state(user, v).get("learnt_from", [])
    ]


def _records_of(s: Settings, topic: str, user: str) -> list[Any]:
    return [r for r in read_topic(s.kafka_bootstrap, topic) if r.key == user.encode()]


@pytest.fixture
def settings(kafka_bootstrap: str, tmp_path: Path) -> Iterator[Settings]:
    s = isolated_settings(kafka_bootstrap, tmp_path, min_batch=1)
    ensure_loraloop_topics(s)
    yield s


def test_a_restarted_learner_does_not_bring_a_deleted_user_back(settings: Settings) -> None:
    s, store = settings, AdapterStore(settings.adapter_store)
    producer = KafkaProducer(bootstrap_servers=s.kafka_bootstrap)
    first = Learner(s, max_users_per_step=2)
    try:
        first.connect()
        before = int(time.time() * 1000) - 10_000
        _send_pair(producer, s, GONE, "learnt-before", before)
        _send_pair(producer, s, OTHER, "other-1", before)
        drain_learner(first, lambda: bool(store.versions(GONE) and store.versions(OTHER)), "v1s")
        # Interactions of requests that started before the deletion stay unconsumed: the
        # learner pauses those partitions while it processes the tombstone, then stops.
        first.consumer.pause(*_partitions(first, s.topic_interactions, s.topic_feedback))
        _send_pair(producer, s, GONE, "unconsumed-before", before + 1_000)
        deleted_at = int(time.time() * 1000)
        _server_tombstone(producer, s, GONE, deleted_at)
        drain_learner(first, lambda: not store.user_dir(GONE).exists(), "the deletion")
    finally:
        first.close()

    # Late ones: published after the deletion, stamped with their request's start.
    _send_pair(producer, s, GONE, "started-before", deleted_at - 1)
    _send_pair(producer, s, GONE, "started-after", deleted_at + 1)
    producer.close()

    second = Learner(s, max_users_per_step=2)
    try:
        started = time.monotonic()
        second.connect()
        connect_s = time.monotonic() - started
        assert second.deleted.deleted_at(GONE) == deleted_at  # rebuilt from the tombstone
        assert OTHER not in second.deleted
        drain_learner(
            second,
            lambda: bool(store.versions(GONE)) and second.stats["skipped_deleted"] >= 4,
            "the restarted learner to read every event of the deleted user",
        )
        for _ in range(3):  # nothing else comes
            second.process([r for b in second.consumer.poll(timeout_ms=200).values() for r in b])
        stats = dict(second.stats)
    finally:
        second.close()

    # Only the interaction started after the deletion was learnt: a new user's v1.
    assert store.versions(GONE) == [1]
    assert _learnt(store, GONE) == ["started-after"]
    assert _learnt(store, OTHER) == ["other-1"]
    # unconsumed-before and started-before, each an interaction and a feedback
    assert stats["skipped_deleted"] == 4, stats
    print(
        f"\nrestarted learner: {stats['deletions_restored']} deletions restored from the "
        f"compacted topic (connect {connect_s:.2f} s); pre-deletion events dropped: "
        f"{stats['skipped_deleted']}; {GONE} now learnt from {_learnt(store, GONE)}"
    )


def test_the_learners_own_tombstone_is_only_an_echo(settings: Settings) -> None:
    s, store = settings, AdapterStore(settings.adapter_store)
    producer = KafkaProducer(bootstrap_servers=s.kafka_bootstrap)
    learner = Learner(s, max_users_per_step=2)
    try:
        learner.connect()
        early = int(time.time() * 1000) - 10_000
        _send_pair(producer, s, GONE, "r1", early)
        _send_pair(producer, s, OTHER, "o1", early)
        drain_learner(learner, lambda: bool(store.versions(GONE) and store.versions(OTHER)), "v1s")
        updates = _partitions(learner, s.topic_adapter_updates)

        # OTHER: deleted with nothing announced after the tombstone: no learner tombstone.
        _server_tombstone(producer, s, OTHER, int(time.time() * 1000))
        drain_learner(learner, lambda: not store.user_dir(OTHER).exists(), f"{OTHER}'s deletion")

        # GONE: the learner has not read the tombstone yet and learns v2 from a sample it
        # consumed first: v2 is announced after the tombstone.
        learner.consumer.pause(*updates)
        deleted_at = int(time.time() * 1000)
        _server_tombstone(producer, s, GONE, deleted_at)
        _send_pair(producer, s, GONE, "r2", deleted_at - 500)
        drain_learner(learner, lambda: len(store.versions(GONE)) == 2, "v2 after the tombstone")
        learner.consumer.resume(*updates)
        drain_learner(learner, lambda: not store.user_dir(GONE).exists(), f"{GONE}'s deletion")
        # The echo is on its way back; before the learner reads it, the user comes back
        # with a request started after the deletion.
        learner.consumer.pause(*updates)
        _send_pair(producer, s, GONE, "after", deleted_at + 1)
        drain_learner(learner, lambda: store.versions(GONE) == [1], "a new v1 after the deletion")
        learner.consumer.resume(*updates)
        echo = [r for r in _records_of(s, s.topic_adapter_updates, GONE) if r.headers]
        assert len(echo) == 1, echo
        tp = TopicPartition(s.topic_adapter_updates, echo[0].partition)
        drain_learner(
            learner,
            lambda: learner.consumer.position(tp) > echo[0].offset,
            "the learner to consume its own tombstone",
        )
        for _ in range(3):
            learner.process([r for b in learner.consumer.poll(timeout_ms=200).values() for r in b])
        stats, deleted_seen = dict(learner.stats), learner.deleted.deleted_at(GONE)
    finally:
        learner.close()
        producer.close()

    headers = dict(echo[0].headers)
    assert echo[0].value is None
    assert headers[ORIGIN_HEADER] == b"learner"
    assert int(headers[DELETED_AT_HEADER]) == deleted_at == echo[0].timestamp
    # the echo changed nothing: deletion time, the post-deletion v1, the deletion count
    assert deleted_seen == deleted_at
    assert store.versions(GONE) == [1] and _learnt(store, GONE) == ["after"]
    assert stats["deleted_users"] == 2, stats
    kinds = [
        "tombstone" if r.value is None else "update"
        for r in _records_of(s, s.topic_adapter_updates, GONE)
    ]
    # v1, the server's tombstone, v2 (announced after it), the echo, the new v1
    assert kinds == ["update", "tombstone", "update", "tombstone", "update"], kinds
    other = _records_of(s, s.topic_adapter_updates, OTHER)
    assert [r.value is None for r in other] == [False, True]  # no echo needed
    assert not any(r.headers for r in other)
    bandit = _records_of(s, s.topic_bandit_state, OTHER)
    assert bandit[-1].value is None and dict(bandit[-1].headers)[ORIGIN_HEADER] == b"learner"
    print(
        f"\necho: {GONE}'s records on adapter-updates {kinds}; deletion time kept "
        f"({deleted_seen} ms), post-deletion v1 kept; {OTHER} deleted without an echo"
    )
