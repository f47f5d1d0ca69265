"""DeleteUser forgets a user everywhere: store, compacted topics, learner, server caches.

Real broker, real server (in process), real learner. A user learns (adapter versions,
bandit statistics, cached adapters on the server), is deleted, and afterwards: no file of
theirs is left in the store, the newest record of their key on `adapter-updates` and
`bandit-state` is a tombstone, the learner and the server hold nothing of theirs,
GetUserState is empty, Generate serves them like a brand-new user, and events from before
the deletion that arrive late do not bring them back. Another user is untouched.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from kafka import KafkaProducer

from loraloop.client import LoraLoopClient
from loraloop.configs import DEMO_ARMS
from loraloop.core.adapters.store import AdapterStore
from loraloop.core.adapters.version import AdapterVersion
from loraloop.core.gen.loraloop.v1 import events_pb2
from loraloop.core.kafka.admin import ensure_loraloop_topics
from loraloop.learner.deletions import ORIGIN_HEADER
from loraloop.learner.loop import Learner
from tests.support import (
    InProcessServer,
    drain_learner,
    feedback_event,
    interaction_event,
    isolated_settings,
    read_topic,
    wait_until,
)

pytestmark = pytest.mark.kafka

GONE, KEPT = "dora", "ed"


def _latest_by_key(bootstrap: str, topic: str) -> tuple[dict[bytes, Any], dict[bytes, int]]:
    """Newest value of each key (what compaction keeps) and how many non-null records
    each key had."""
    latest: dict[bytes, Any] = {}
    values: dict[bytes, int] = {}
    for record in read_topic(bootstrap, topic):
        latest[record.key] = record.value
        values[record.key] = values.get(record.key, 0) + int(record.value is not None)
    return latest, values


def _revived_after_tombstone(bootstrap: str, topic: str, user: str) -> bool:
    """True when the topic holds a non-null record of `user` after one of its tombstones."""
    seen_tombstone = False
    for record in read_topic(bootstrap, topic):
        if record.key == user.encode():
            if record.value is None:
                seen_tombstone = True
            elif seen_tombstone:
                return True
    return False


def _held_by_server(service: Any, user: str) -> dict[str, bool]:
    engine, registry, strategy = service.engine, service.registry, service.strategy
    return {
        "registry version": registry.resolve(user) is not None,
        "registry publish times": any(k[0] == user for k in list(registry._published_at)),
        "host adapter cache": any(k[0] == user for k in list(engine.host_cache._entries)),
        "engine slots": any(k[0] == user for k in list(engine.slots._resident)),
        "bandit state": user in strategy._states,
        "rejected adapter versions": registry.rejections_held(user) > 0,
    }


def _held_by_learner(learner: Learner, user: str) -> dict[str, bool]:
    pending = [*learner.joiner._interactions.values(), *learner.joiner._feedback.values()]
    return {
        "user model cache": user in learner.users._cache,
        "samples ready": bool(learner._ready.get(user)),
        "joiner pending": any(p.event.user_id == user for p in pending),
        "bandit to publish": user in learner._bandit_dirty,
        "announced": user in getattr(learner, "_announced", set()),
        "unreadable notes": any(k[0] == user for k in getattr(learner.users, "_unreadable", ())),
    }


@pytest.fixture
def loop(kafka_bootstrap: str, tmp_path: Path) -> Iterator[tuple[Any, InProcessServer, Learner]]:
    settings = isolated_settings(
        kafka_bootstrap, tmp_path, arms_file=DEMO_ARMS, max_new_tokens=8, min_batch=1
    )
    ensure_loraloop_topics(settings)
    server = InProcessServer(settings)
    learner = Learner(settings, max_users_per_step=4)
    try:
        learner.connect()
        yield settings, server, learner
    finally:
        learner.close()
        server.stop()


def test_delete_user_leaves_nothing_behind(loop) -> None:
    settings, server, learner = loop
    service = server.running.service
    store = AdapterStore(settings.adapter_store)
    bootstrap = settings.kafka_bootstrap

    with LoraLoopClient(server.target, timeout=60, retries=1) as client:
        # --- both users learn ---------------------------------------------------------
        for i in range(2):
            for user in (GONE, KEPT):
                reply = client.generate(user, "Tell me about travel", max_tokens=6, seed=i)
                assert client.feedback(reply.request_id, user, thumbs=1, copied=True)
        service.events.flush()
        drain_learner(
            learner,
            lambda: bool(store.versions(GONE)) and bool(store.versions(KEPT)),
            "both users' first adapter versions",
            90,
        )
        wait_until(
            lambda: service.registry.resolve(GONE) is not None and GONE in service.strategy._states,
            30,
            "the server to follow the new version and bandit state",
        )
        served = client.generate(GONE, "Tell me about travel", max_tokens=4, seed=5)
        assert served.adapter_version >= 1  # the adapter is now in the engine's caches
        # a version of theirs that failed to load here (an I/O error): rejected for a while
        failed = AdapterVersion(GONE, 99, store.version_dir(GONE, 99))
        service.registry.reject(failed, "simulated EIO", transient=True)
        before_server = _held_by_server(service, GONE)
        assert all(v for k, v in before_server.items() if k != "registry publish times")
        kept_versions = store.versions(KEPT)

        # --- delete, while the learner is busy with the user ------------------------------
        # The learner has not read the tombstone yet (its adapter-updates partitions are
        # paused) and learns from a sample it already has: that version is published
        # *after* the tombstone, and must not be the user's last word on the topic.
        assert learner.consumer is not None
        updates = [
            tp for tp in learner.consumer.assignment() if tp.topic == settings.topic_adapter_updates
        ]
        assert updates
        learner.consumer.pause(*updates)
        client.generate(GONE, "An interaction still waiting for feedback", max_tokens=4)
        late = client.generate(GONE, "One more question", max_tokens=4)
        assert client.feedback(late.request_id, GONE, thumbs=-1)
        service.events.flush()
        started = time.monotonic()
        assert client.delete_user(GONE)
        service.events.flush()
        drain_learner(
            learner,
            lambda: (
                len(store.versions(GONE)) >= 2 and _held_by_learner(learner, GONE)["joiner pending"]
            ),
            "the learner to write a version after the tombstone",
            60,
        )
        before_learner = _held_by_learner(learner, GONE)
        assert before_learner["joiner pending"] and before_learner["user model cache"]
        learner.consumer.resume(*updates)
        user_dir = store.root / GONE
        drain_learner(learner, lambda: not user_dir.exists(), "the learner to delete the store", 60)
        store_forgot_s = time.monotonic() - started
        # A few more rounds: the learner reads back its own tombstone and answers nothing.
        for _ in range(5):
            polled = learner.consumer.poll(timeout_ms=300)
            learner.process([r for batch in polled.values() for r in batch])

        # Late events from before the deletion (e.g. from a server's queue) are dropped.
        stale_ms = int(time.time() * 1000) - 5_000
        interaction = interaction_event(GONE, "stale-before-delete", stale_ms, arm="default")
        feedback = feedback_event(GONE, "stale-before-delete", stale_ms)
        producer = KafkaProducer(bootstrap_servers=bootstrap)
        producer.send(
            settings.topic_interactions, key=GONE.encode(), value=interaction.SerializeToString()
        )
        producer.send(
            settings.topic_feedback, key=GONE.encode(), value=feedback.SerializeToString()
        )
        producer.flush()
        producer.close()
        drain_learner(
            learner,
            lambda: learner.stats["skipped_deleted"] >= 2,
            "the late events to be read and dropped",
            30,
        )

        # --- nothing of the user is left ----------------------------------------------
        leftovers = [p for p in store.root.rglob("*") if GONE in str(p.relative_to(store.root))]
        assert not user_dir.exists() and leftovers == []
        assert store.versions(KEPT) == kept_versions  # the other user is untouched

        summary = {}
        for topic in (settings.topic_adapter_updates, settings.topic_bandit_state):
            latest, values = _latest_by_key(bootstrap, topic)
            assert values.get(GONE.encode(), 0) >= 1, f"{topic} never had {GONE}: test is void"
            assert GONE.encode() in latest and latest[GONE.encode()] is None, topic
            assert latest.get(KEPT.encode()) is not None, topic
            summary[topic] = values[GONE.encode()]

        # the race happened: a version came after the server's tombstone, and the
        # learner's own tombstone still has the last word
        assert _revived_after_tombstone(bootstrap, settings.topic_adapter_updates, GONE)
        # ... marked as the learner's, stamped with the server's deletion time, which its
        # echo did not move; the server's tombstone is the only deletion the learner did
        tombstones = [
            r
            for r in read_topic(bootstrap, settings.topic_adapter_updates)
            if r.key == GONE.encode() and r.value is None
        ]
        server_tombstone, echo = tombstones[0], tombstones[-1]
        assert len(tombstones) == 2 and not server_tombstone.headers, tombstones
        assert dict(echo.headers)[ORIGIN_HEADER] == b"learner"
        assert echo.timestamp == server_tombstone.timestamp
        assert learner.deleted.deleted_at(GONE) == server_tombstone.timestamp
        assert learner.stats["deleted_users"] == 1

        after_learner = _held_by_learner(learner, GONE)
        assert not any(after_learner.values()), after_learner
        wait_until(
            lambda: not any(_held_by_server(service, GONE).values()),
            30,
            f"the server to drop {GONE}: {_held_by_server(service, GONE)}",
        )
        assert service.registry.resolve(KEPT) is not None

        state = client.user_state(GONE)
        assert (state.adapter_version, state.updates, state.arms) == (0, 0, ())
        # Served like a user never seen: the base model, same text as a brand-new user.
        again = client.generate(GONE, "Tell me about travel", max_tokens=8, seed=3, arm="default")
        fresh = client.generate(
            "never-seen", "Tell me about travel", max_tokens=8, seed=3, arm="default"
        )
        assert again.adapter_version == 0 and again.text == fresh.text

    print(
        f"\ndeleted {GONE}: store empty {store_forgot_s:.2f}s after DeleteUser; "
        f"non-null records superseded by tombstones: {summary}; "
        f"late pre-deletion events dropped: {learner.stats['skipped_deleted']}; "
        f"server held before: {sorted(k for k, v in before_server.items() if v)}; "
        f"learner held before: {sorted(k for k, v in before_learner.items() if v)}"
    )


def test_a_generation_running_across_the_deletion_predates_it(
    kafka_bootstrap: str, tmp_path: Path
) -> None:
    """A GenerateStream for a user is running when DeleteUser comes: its Interaction is
    stamped with the request's start, before the tombstone's timestamp, so the learner
    (which drops events at or before the deletion) does not bring the user back."""
    settings = isolated_settings(kafka_bootstrap, tmp_path, max_new_tokens=64)
    ensure_loraloop_topics(settings)
    server = InProcessServer(settings)
    service = server.running.service
    try:
        with LoraLoopClient(server.target, timeout=60, retries=1) as client:
            stream = client.stream(GONE, "Tell me a long story", max_tokens=64, temperature=10.0)
            next(stream)  # generating now
            # nothing of theirs existed yet (deleted=False); the deletion is recorded anyway
            assert client.delete_user(GONE) is False
            *_, final = stream
        service.events.flush()
    finally:
        server.stop()
    (interaction,) = [
        events_pb2.Interaction.FromString(r.value)
        for r in read_topic(kafka_bootstrap, settings.topic_interactions)
        if r.key == GONE.encode()
    ]
    (tombstone,) = [
        r
        for r in read_topic(kafka_bootstrap, settings.topic_adapter_updates)
        if r.key == GONE.encode() and r.value is None
    ]
    assert interaction.request_id == final.request_id
    print(
        f"\ninteraction stamped {tombstone.timestamp - interaction.timestamp_ms} ms before the "
        f"tombstone of a DeleteUser sent while it generated ({final.completion_tokens} tokens)"
    )
    assert interaction.timestamp_ms < tombstone.timestamp
