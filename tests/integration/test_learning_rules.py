"""The learner's rules against the real broker: the bandit loop through the server, the
rollback guard, default rewards for feedback that never came."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
import torch
from kafka import KafkaProducer

from loraloop.client import LoraLoopClient
from loraloop.configs import DEMO_ARMS
from loraloop.core.adapters.peft_format import read_peft_dir
from loraloop.core.adapters.store import AdapterStore
from loraloop.core.bandits.features import DIM
from loraloop.core.gen.loraloop.v1 import events_pb2
from loraloop.learner import ope
from loraloop.learner.loop import Learner
from loraloop.learner.ope_report import read_logs, run_ope
from tests.support import (
    InProcessServer,
    feedback_event,
    interaction_event,
    isolated_settings,
    read_topic,
    wait_until,
)

pytestmark = pytest.mark.kafka


def _drain(learner: Learner, rounds: int = 12) -> None:
    assert learner.consumer is not None
    for _ in range(rounds):
        polled = learner.consumer.poll(timeout_ms=250)
        learner.process([r for batch in polled.values() for r in batch])


def _interaction(user: str, rid: str, ts: int) -> bytes:
    return interaction_event(user, rid, ts).SerializeToString()


def _feedback(user: str, rid: str, ts: int, thumbs: int) -> bytes:
    return feedback_event(user, rid, ts, thumbs).SerializeToString()


def test_bandit_learns_the_users_arm_through_server_and_learner(
    kafka_bootstrap: str, tmp_path: Path
) -> None:
    settings = isolated_settings(kafka_bootstrap, tmp_path, arms_file=DEMO_ARMS)
    server = InProcessServer(settings)
    learner = Learner(settings, max_users_per_step=4)
    learner.connect()
    stop = threading.Event()
    thread = threading.Thread(target=learner.run, args=(stop,), daemon=True)
    thread.start()
    strategy = server.running.service.strategy
    arms_played = []
    try:
        with LoraLoopClient(server.target, timeout=60) as client:
            for i in range(24):
                reply = client.generate(
                    "zed", messages=[("user", "How do I cook rice?")], max_tokens=6
                )
                arms_played.append(reply.arm)
                client.feedback(reply.request_id, "zed", thumbs=1 if reply.arm == "brief" else -1)
                wait_until(
                    lambda n=i + 1: sum(p for _, p, _ in strategy.arm_stats("zed")) == n,
                    20,
                    "the learner's bandit statistics to reach the server",
                )
            state = {a: (n, m) for a, n, m in client.user_state("zed").arms}
    finally:
        stop.set()
        thread.join(30)
        learner.close()
        server.stop()
    assert state["brief"][0] > 0 and state["brief"][1] == 1.0
    assert all(m == -1.0 for a, (n, m) in state.items() if a != "brief" and n)
    assert arms_played[-8:].count("brief") >= 6, arms_played
    events = [
        events_pb2.Interaction.FromString(r.value)
        for r in read_topic(kafka_bootstrap, settings.topic_interactions)
    ]
    assert len(events) == 24
    assert all(0 < e.arm_propensity <= 1 and len(e.context) == DIM for e in events)
    assert all(e.prompt.startswith("system: ") == (e.arm != "default") for e in events)

    # off-policy evaluation from the same logs: always playing "brief" earned +1 each time
    logs, arms = read_logs(settings)
    assert len(logs.actions) == 24
    brief = ope.fixed_arm(arms.index("brief"), len(arms))
    assert ope.snips(logs, brief).value == pytest.approx(1.0)
    assert ope.doubly_robust(logs, brief, len(arms)).value > 0.5
    assert run_ope(settings) == 0


def test_kl_guard_rolls_the_user_back_to_the_base(kafka_bootstrap: str, tmp_path: Path) -> None:
    settings = isolated_settings(kafka_bootstrap, tmp_path, kl_limit=1e-9, learning_rate=0.05)
    learner = Learner(settings, max_users_per_step=2)
    learner.connect()
    producer = KafkaProducer(bootstrap_servers=kafka_bootstrap)
    for i in range(2):
        producer.send(
            settings.topic_interactions, key=b"kim", value=_interaction("kim", f"r{i}", i)
        )
        producer.send(settings.topic_feedback, key=b"kim", value=_feedback("kim", f"r{i}", i, 1))
        producer.flush()
        _drain(learner, rounds=6)
    learner.close()
    updates = [
        events_pb2.AdapterUpdated.FromString(r.value)
        for r in read_topic(kafka_bootstrap, settings.topic_adapter_updates)
        if r.value
    ]
    assert [(u.version, u.metrics.rolled_back) for u in updates] == [(1, ""), (2, "kl")]
    store = AdapterStore(settings.adapter_store)
    stepped, rolled = (
        read_peft_dir(store.get("kim", 1).path),
        read_peft_dir(store.get("kim", 2).path),
    )
    assert any(float(b.abs().max()) > 0 for b in stepped.b.values())  # v1 moved
    assert all(torch.equal(b, torch.zeros_like(b)) for b in rolled.b.values())  # v2 is the base
    assert store.learner_state("kim", 2)["rollbacks"] == 1


def test_default_reward_when_feedback_never_comes_and_late_feedback_is_dropped(
    kafka_bootstrap: str, tmp_path: Path
) -> None:
    settings = isolated_settings(
        kafka_bootstrap, tmp_path, reward_wait_seconds=1.0, default_reward=-0.5
    )
    learner = Learner(settings, max_users_per_step=2)
    learner.connect()
    producer = KafkaProducer(bootstrap_servers=kafka_bootstrap)
    producer.send(settings.topic_interactions, key=b"lou", value=_interaction("lou", "r1", 1_000))
    producer.send(settings.topic_interactions, key=b"lou", value=_interaction("lou", "r2", 2_500))
    producer.flush()
    _drain(learner, rounds=6)
    producer.send(settings.topic_feedback, key=b"lou", value=_feedback("lou", "r1", 2_600, 1))
    producer.flush()
    _drain(learner, rounds=6)
    learner.close()
    store = AdapterStore(settings.adapter_store)
    assert store.versions("lou") == [1]  # r1 expired (r2 moved event time past its window)
    updates = [
        events_pb2.AdapterUpdated.FromString(r.value)
        for r in read_topic(kafka_bootstrap, settings.topic_adapter_updates)
        if r.value
    ]
    assert updates[0].metrics.mean_reward == -0.5
    assert learner.stats["default_rewards"] == 1 and learner.joiner.late == 1
