"""Event delivery to Kafka is at-least-once: an event in flight when the broker freezes
(SIGSTOP) is copied to the spill journal once the server gives up on its producer
(event_abandon_seconds), and when the broker resumes it may append the original request
it had already received as well as the journal's copy. Such duplicates are harmless: the
learner recognises every copy by request id, counts it
(`loraloop_learner_duplicates_total`), and learns each interaction once.

A real server under Generate + Feedback traffic, a broker of this module's own frozen
three times for longer than the abandon timeout, then a learner that reads everything.
"""

from __future__ import annotations

import collections
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from loraloop.client import LoraLoopClient
from loraloop.core.adapters.store import AdapterStore
from loraloop.core.gen.loraloop.v1 import events_pb2
from loraloop.core.kafka.admin import ensure_loraloop_topics
from loraloop.devtools.kafka_broker import KafkaBroker
from loraloop.learner.loop import Learner
from tests.faults.crash_support import committed_to_end
from tests.support import (
    CallerThreads,
    InProcessServer,
    isolated_settings,
    own_broker,
    read_topic,
    wait_until,
)

pytestmark = pytest.mark.kafka
FREEZES = 3
FREEZE_S = 7.0  # beyond event_abandon_seconds (5 s): the server journals what is in flight


@pytest.fixture(scope="module")
def frozen_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[KafkaBroker]:
    with own_broker(tmp_path_factory.mktemp("dup-kafka")) as kafka:
        try:
            yield kafka
        finally:
            if kafka.pid is not None:
                os.kill(kafka.pid, signal.SIGCONT)  # a frozen broker would not stop


class Users(CallerThreads):
    """Closed-loop callers: Generate, then Feedback on the reply, on their own threads."""

    def __init__(self, target: str, callers: int = 3) -> None:
        super().__init__(callers)
        self.target = target
        self.answered: list[str] = []  # request ids whose feedback was accepted
        self.errors: collections.Counter[str] = collections.Counter()

    def wait_for(self, more: int, what: str) -> None:
        """Until `more` further calls were answered."""
        target = len(self.answered) + more
        wait_until(lambda: len(self.answered) >= target, 60, what)

    def _loop(self, caller: int) -> None:
        with LoraLoopClient(self.target, timeout=30) as client:
            n = 0
            while not self._stop.is_set():
                user = f"dup-{caller}-{n % 3}"
                try:
                    reply = client.generate(user, f"Tell me about city {n}", max_tokens=4, seed=n)
                    client.feedback(reply.request_id, user, thumbs=1 if n % 2 else -1)
                    self.answered.append(reply.request_id)
                except grpc.RpcError as exc:
                    self.errors[exc.code().name] += 1
                n += 1


def _copies(bootstrap: str, topic: str, event: Any) -> collections.Counter[str]:
    """How many records of `topic` carry each request id."""
    return collections.Counter(
        event.FromString(r.value).request_id for r in read_topic(bootstrap, topic)
    )


def test_events_sent_as_kafka_freezes_arrive_at_least_once_and_are_learnt_once(
    frozen_broker: KafkaBroker, tmp_path: Path
) -> None:
    settings = isolated_settings(
        frozen_broker.bootstrap,
        tmp_path,
        max_new_tokens=4,
        spill_dir=tmp_path / "spill",
        adapter_keep_versions=0,  # every version stays, for the audit
    )
    ensure_loraloop_topics(settings)
    pid = frozen_broker.pid
    assert pid is not None
    server = InProcessServer(settings)
    events = server.running.service.events
    try:
        with Users(server.target) as users:
            users.wait_for(20, "traffic before the freezes")
            for _ in range(FREEZES):
                os.kill(pid, signal.SIGSTOP)
                try:
                    time.sleep(FREEZE_S)
                finally:
                    os.kill(pid, signal.SIGCONT)
                users.wait_for(20, "traffic after a freeze")
        assert events.flush(timeout=60), f"events not delivered: backlog {events.backlog}"
        delivered, spilled = events.delivered, events.spilled
    finally:
        server.stop()

    s = settings
    interactions = _copies(s.kafka_bootstrap, s.topic_interactions, events_pb2.Interaction)
    feedback = _copies(s.kafka_bootstrap, s.topic_feedback, events_pb2.FeedbackEvent)
    records = sum(interactions.values()) + sum(feedback.values())
    duplicated = {
        "interactions": sum(n - 1 for n in interactions.values()),
        "feedback": sum(n - 1 for n in feedback.values()),
    }
    assert set(users.answered) <= set(interactions) & set(feedback)  # at least once

    learner = Learner(settings, max_users_per_step=16)
    try:
        learner.connect()
        assert learner.consumer is not None
        deadline = time.monotonic() + 240
        while not (learner.stats["samples"] >= len(feedback) and committed_to_end(settings)):
            assert time.monotonic() < deadline, (learner.stats, learner.joiner.counters())
            polled = learner.consumer.poll(timeout_ms=300)
            learner.process([r for batch in polled.values() for r in batch])
        seen = learner.joiner.duplicates + learner.stats["skipped_duplicate"]
        stats = dict(learner.stats)
    finally:
        learner.close()

    store = AdapterStore(settings.adapter_store)
    learnt = collections.Counter(
        rid
        for user in store.root.iterdir()
        for v in store.versions(user.name)
        for rid, _ in store.learner_state(user.name, v)["learnt_from"]
    )
    print(
        f"\nbroker frozen {FREEZES}x {FREEZE_S:.0f} s under traffic: {len(users.answered)} "
        f"Generate+Feedback answered ({dict(users.errors) or 'no errors'}); {records} event "
        f"records on the topics, server counted {delivered} delivered ({spilled} spilled); "
        f"duplicated records {duplicated}; learner counted {seen} duplicates, learnt "
        f"{sum(learnt.values())} samples for {len(learnt)} request ids "
        f"(max {max(learnt.values())} per id), {stats['versions']} versions"
    )
    assert not users.errors
    assert seen == sum(duplicated.values())  # every copy recognised and counted
    assert set(learnt) == set(interactions) & set(feedback)  # every interaction learnt...
    assert max(learnt.values()) == 1  # ...once
