"""Duplicate, reordered and late events, produced to the real broker: each is handled by its
rule, counted in the learner's metrics, and no sample is applied twice, also when the
duplicate arrives after a restart (a producer's retry, a replayed journal), when only the
request_ids stored with the user's versions can recognise it."""

from __future__ import annotations

import collections
from pathlib import Path

import pytest
from kafka import KafkaProducer
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from loraloop.core.adapters.store import AdapterStore
from loraloop.learner.loop import Learner
from tests.support import feedback_event, interaction_event, isolated_settings

pytestmark = pytest.mark.kafka


def _metrics(learner: Learner) -> dict[str, float]:
    values = {}
    text = generate_latest(learner.metrics.registry).decode()
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            label = ",".join(f"{v}" for _, v in sorted(sample.labels.items()))
            values[f"{sample.name}[{label}]" if label else sample.name] = sample.value
    return values


def _drain(learner: Learner, rounds: int = 10) -> None:
    assert learner.consumer is not None
    for _ in range(rounds):
        polled = learner.consumer.poll(timeout_ms=250)
        learner.process([r for batch in polled.values() for r in batch])


class Producer:
    def __init__(self, settings) -> None:
        self.settings = settings
        self.kafka = KafkaProducer(bootstrap_servers=settings.kafka_bootstrap)
        self.records = 0

    def interaction(self, user: str, rid: str, ts: int) -> None:
        event = interaction_event(user, rid, ts)
        self._send(self.settings.topic_interactions, user, event.SerializeToString())

    def feedback(self, user: str, rid: str, ts: int, thumbs: int = 1) -> None:
        event = feedback_event(user, rid, ts, thumbs)
        self._send(self.settings.topic_feedback, user, event.SerializeToString())

    def _send(self, topic: str, user: str, value: bytes) -> None:
        self.kafka.send(topic, key=user.encode(), value=value)
        self.records += 1

    def flush(self) -> None:
        self.kafka.flush()


def test_duplicates_reordering_and_late_events_are_counted_and_applied_once(
    kafka_bootstrap: str, tmp_path: Path
) -> None:
    settings = isolated_settings(kafka_bootstrap, tmp_path, reward_wait_seconds=1.0)
    send = Producer(settings)
    send.feedback("ann", "a1", 1_000)  # reordered: the feedback before its interaction
    send.interaction("ann", "a1", 1_000)
    send.interaction("ann", "a2", 1_100)
    send.interaction("ann", "a2", 1_100)  # duplicate interaction, at a new offset
    send.feedback("ann", "a2", 1_150)
    send.feedback("ann", "a2", 1_150)  # duplicate feedback
    send.interaction("ben", "b1", 1_200)  # its feedback comes after the window: late
    send.feedback("cat", "c1", 1_300)  # feedback for an interaction never logged: orphaned
    send.interaction("dan", "d1", 1_400)
    send.feedback("eve", "d1", 1_450)  # another user's feedback for dan's request: mismatched
    send.flush()
    learner = Learner(settings, max_users_per_step=4)
    learner.connect()
    _drain(learner)  # (event time stays within every window, whatever order records come in)
    send.interaction("ann", "a3", 5_000)  # moves event time past every window above
    send.feedback("ann", "a3", 5_000)
    send.flush()
    _drain(learner, rounds=6)
    send.feedback("ben", "b1", 5_100)
    send.flush()
    _drain(learner, rounds=6)
    first = _metrics(learner)
    learner.close()

    # After a restart the joiner remembers nothing: a copy of a1 produced again (a
    # producer's retry) is recognised by the request_ids stored with ann's versions.
    send.interaction("ann", "a1", 5_200)
    send.feedback("ann", "a1", 5_200)
    send.flush()
    restarted = Learner(settings, max_users_per_step=4)
    restarted.connect()
    _drain(restarted, rounds=6)
    second = _metrics(restarted)
    restarted.close()

    store = AdapterStore(settings.adapter_store)
    learnt = collections.Counter(
        rid
        for user in ("ann", "ben", "cat", "dan", "eve")
        for v in store.versions(user)
        for rid, _ in store.learner_state(user, v)["learnt_from"]
    )
    outcomes = {
        o: first[f"loraloop_learner_joiner_events_total[{o}]"]
        for o in ("duplicate", "expired", "late", "orphaned", "mismatched")
    }
    skipped = second["loraloop_learner_samples_skipped_total[already_applied]"]
    print(
        f"{send.records} events produced: joiner outcomes {outcomes}; after a restart "
        f"{skipped:.0f} re-produced sample skipped; applied {dict(learnt)}"
    )
    assert outcomes == {"duplicate": 2, "expired": 1, "late": 1, "orphaned": 1, "mismatched": 1}
    assert skipped == 1 and second["loraloop_learner_versions_written_total"] == 0
    # every copy counted as a duplicate: two seen by the joiner, the re-produced a1 (a
    # copy at another offset, after the restart) by the request ids in the store
    assert first["loraloop_learner_duplicates_total[joiner]"] == 2
    assert second["loraloop_learner_duplicates_total[store]"] == 1
    assert learnt == {"a1": 1, "a2": 1, "a3": 1}  # each once; b1, c1, d1 never
    assert first["loraloop_learner_samples_total"] == 3
