"""Replicated Kafka: a 3-broker KRaft cluster (the real broker jars, on loopback), topics
with 3 replicas and min.insync.replicas 2, and one broker SIGKILLed under load.

Generate/Feedback traffic runs against the real server while `loraloop learn` learns from
it; the leader of an interactions partition is killed mid-way and stays down. Everything
is counted from the topics, read back afterwards: every answered Generate has its
interaction on the topic, every accepted Feedback its event, and every joined sample is in
exactly one adapter version (the versions' audit in the store, and the sample counts the
learner announced on adapter-updates). Figures are printed (`pytest -s`).
"""

from __future__ import annotations

import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest

from loraloop.client import LoraLoopClient
from loraloop.core.adapters.store import AdapterStore
from loraloop.core.gen.loraloop.v1 import events_pb2
from loraloop.core.kafka.admin import (
    KafkaReplicationError,
    create_topics,
    ensure_loraloop_topics,
    partition_replicas,
    topic_configs,
)
from loraloop.core.settings import Settings
from loraloop.devtools.kafka_broker import KafkaCluster
from loraloop.learner.loop import Learner
from tests.faults.crash_support import announced_versions, audit, committed_to_end
from tests.support import (
    CallerThreads,
    InProcessServer,
    Process,
    isolated_settings,
    read_topic,
    settings_env,
    wait_until,
)

pytestmark = pytest.mark.kafka
USERS = ("ana", "bo", "cy", "di")


@pytest.fixture
def cluster(kafka_cluster: KafkaCluster) -> Iterator[KafkaCluster]:
    """The session's 3-broker cluster, every broker up again afterwards."""
    yield kafka_cluster
    kafka_cluster.restart_stopped()


def replicated(cluster: KafkaCluster, tmp_path: Path, **overrides: object) -> Settings:
    return isolated_settings(
        cluster.bootstrap,
        tmp_path,
        kafka_replication_factor=3,
        kafka_min_insync_replicas=2,
        **overrides,
    )


def replicas(bootstrap: str, topic: str) -> list[tuple[int, int]]:
    """(replicas, in-sync replicas) of each partition of `topic`."""
    return [(len(p.replicas), len(p.in_sync)) for p in partition_replicas(bootstrap, topic)]


def test_topics_are_replicated_and_a_cluster_too_small_is_refused(
    cluster: KafkaCluster, tmp_path: Path
) -> None:
    settings = replicated(cluster, tmp_path)
    assert sorted(ensure_loraloop_topics(settings)) == sorted(
        [
            settings.topic_interactions,
            settings.topic_feedback,
            settings.topic_adapter_updates,
            settings.topic_bandit_state,
            settings.topic_dead_letter,
        ]
    )
    want = [(3, 3)] * settings.topic_partitions
    for topic in (settings.topic_interactions, settings.topic_adapter_updates):
        # the broker asked may not have the new topic's metadata yet (then it lists none)
        wait_until(
            lambda t=topic: replicas(settings.kafka_bootstrap, t) == want,
            30,
            f"{topic} described with 3 in-sync replicas per partition",
        )
        assert topic_configs(settings.kafka_bootstrap, topic)["min.insync.replicas"] == "2"
    assert ensure_loraloop_topics(settings) == []  # idempotent, and the check passes

    # More replicas than brokers: refused before Kafka is asked to create anything.
    four = settings.model_copy(update={"kafka_replication_factor": 4})
    with pytest.raises(KafkaReplicationError, match=r"REPLICATION_FACTOR=4.*has 3 broker"):
        ensure_loraloop_topics(four.model_copy(update={"topic_feedback": "fb-" + tmp_path.name}))
    # An existing topic with fewer replicas than asked for is refused too.
    create_topics(cluster.bootstrap, ["thin-" + tmp_path.name], replication_factor=1)
    thin = settings.model_copy(update={"topic_dead_letter": "thin-" + tmp_path.name})
    with pytest.raises(KafkaReplicationError, match="fewer replicas"):
        ensure_loraloop_topics(thin)

    # `loraloop learn` stops at start-up with one line naming the setting.
    env = settings_env(four.model_copy(update={"topic_feedback": "fb2-" + tmp_path.name}))
    proc = subprocess.run(
        [sys.executable, "-m", "loraloop.cli", "learn"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2, proc.stderr
    assert "LORALOOP_KAFKA_REPLICATION_FACTOR=4, but the Kafka cluster" in proc.stderr
    assert "Traceback" not in proc.stderr

    # Both producers wait for every in-sync replica (acks=all), idempotently.
    learner = Learner(settings, max_users_per_step=2)
    try:
        learner.connect()
        assert learner.producer is not None
        assert learner.producer.config["acks"] in (-1, "all")
        assert learner.producer.config["enable_idempotence"]
    finally:
        learner.close()
    server = InProcessServer(settings)
    try:
        link = server.running.service.events._link
        wait_until(lambda: link.producer is not None, 30, "the event producer")
        assert link.producer is not None and link.producer.config["acks"] in (-1, "all")
    finally:
        server.stop()


@dataclass
class Call:
    phase: str  # before / after the kill
    user: str
    ok: bool
    request_id: str = ""
    feedback: bool = False  # feedback accepted


class Load(CallerThreads):
    """Closed-loop users: Generate, then thumbs feedback on the reply."""

    def __init__(self, target: str, callers: int = 2) -> None:
        super().__init__(callers)
        self.phase = "before"
        self.calls: list[Call] = []
        self._client = LoraLoopClient(target, timeout=30)

    def close(self) -> None:
        self._client.close()

    def _loop(self, caller: int) -> None:
        n = 0
        while not self._stop.is_set():
            phase, user = self.phase, USERS[(caller + 2 * n) % len(USERS)]
            try:
                reply = self._client.generate(
                    user, f"Say something about {n}", max_tokens=4, seed=n
                )
            except grpc.RpcError:
                self.calls.append(Call(phase, user, False))
                n += 1
                continue
            try:
                accepted = self._client.feedback(reply.request_id, user, thumbs=1 - 2 * (n % 2))
            except grpc.RpcError:
                accepted = False
            self.calls.append(Call(phase, user, True, reply.request_id, accepted))
            n += 1

    def of(self, phase: str) -> list[Call]:
        return [c for c in self.calls if c.phase == phase]


def by_user(calls: list[Call]) -> dict[str, list[str]]:
    return {u: [c.request_id for c in calls if c.user == u] for u in USERS}


def ids_on(
    bootstrap: str, topic: str, message: type[events_pb2.Interaction | events_pb2.FeedbackEvent]
) -> Counter[str]:
    """Request ids of the events read back from `topic`, with how often each is there."""
    return Counter(message.FromString(r.value).request_id for r in read_topic(bootstrap, topic))


def test_a_broker_killed_under_load_loses_nothing(cluster: KafkaCluster, tmp_path: Path) -> None:
    """SIGKILL the leader of interactions partition 0 while users call Generate and
    Feedback and the learner learns; it stays down (2 of 3 brokers: still min.insync)."""
    settings = replicated(
        cluster,
        tmp_path,
        max_new_tokens=8,
        spill_dir=tmp_path / "spill",
        adapter_keep_versions=0,  # the audit reads every version
        learner_session_timeout_seconds=6,
    )
    ensure_loraloop_topics(settings)
    started = time.monotonic()
    server = InProcessServer(settings)
    events = server.running.service.events
    learner = Process(["learn"], settings, ready=r"learner consuming", timeout=120)
    store = AdapterStore(settings.adapter_store)
    bootstrap, watched = settings.kafka_bootstrap, settings.topic_interactions
    try:
        with Load(server.target) as load:
            wait_until(lambda: len(load.of("before")) >= 40, 90, "traffic before the kill")
            (victim, *_) = [p.leader for p in partition_replicas(bootstrap, watched)]
            load.phase = "after"
            at_kill = [c for c in load.calls if c.feedback]
            behind = len(at_kill) - audit(store, by_user(at_kill)).applied
            killed_at = time.monotonic()
            cluster.nodes[victim - 1].kill()
            fenced_s = (cluster.wait_live(2), time.monotonic() - killed_at)[1]
            wait_until(
                lambda: all(r == 3 and isr == 2 for r, isr in replicas(bootstrap, watched)),
                60,
                "the killed broker to leave the in-sync replicas",
            )
            isr_s = time.monotonic() - killed_at
            during = len(load.of("after"))  # calls while the partitions moved
            wait_until(lambda: len(load.of("after")) >= during + 100, 120, "traffic afterwards")
            load_s = time.monotonic() - killed_at
        assert events.flush(timeout=60), f"events not delivered: backlog {events.backlog}"
        delivered_s = time.monotonic() - killed_at
        served = [c.request_id for c in load.calls if c.ok]
        with_feedback = [c.request_id for c in load.calls if c.feedback]
        produced = by_user([c for c in load.calls if c.feedback])
        wait_until(
            lambda: (
                audit(store, produced).applied >= len(with_feedback) and committed_to_end(settings)
            ),
            120,
            f"the learner to learn every sample\n{learner.output}",
        )
        learnt_s = time.monotonic() - killed_at
    finally:
        rc = learner.stop()
        server.stop()
    assert rc == 0, learner.output

    interactions = ids_on(bootstrap, settings.topic_interactions, events_pb2.Interaction)
    feedback = ids_on(bootstrap, settings.topic_feedback, events_pb2.FeedbackEvent)
    lost = [rid for rid in served if rid not in interactions]
    lost_feedback = [rid for rid in with_feedback if rid not in feedback]
    versions: dict[tuple[str, int], int] = {}
    for record in read_topic(bootstrap, settings.topic_adapter_updates):
        if record.value:
            update = events_pb2.AdapterUpdated.FromString(record.value)
            versions[(update.user_id, update.version)] = update.metrics.samples
    samples = set(interactions) & set(feedback)
    found = audit(store, {u: [r for r in samples if r in produced[u]] for u in USERS})
    newest = {u: store.versions(u)[-1] for u in USERS if store.versions(u)}
    calls, after = load.calls, load.of("after")
    ok = [c for c in calls if c.ok]
    print(
        f"\nbroker {victim} of 3 SIGKILLed (leader of {settings.topic_interactions}/0), left "
        f"down; fenced after {fenced_s:.1f} s, out of the in-sync replicas after {isr_s:.1f} "
        f"s; traffic for {load_s:.0f} s after the kill; all events acknowledged "
        f"{delivered_s:.1f} s after it, every sample "
        f"learnt {learnt_s:.1f} s after it ({time.monotonic() - started:.0f} s in all)\n"
        f"  Generate availability {100 * len(ok) / len(calls):.1f} % ({len(ok)}/{len(calls)}, "
        f"{len(after)} after the kill, {during} of them before the ISR shrank); feedback "
        f"accepted {len(with_feedback)}\n"
        f"  events read back: interactions {sum(interactions.values())} for {len(served)} "
        f"served, lost {len(lost)}, duplicates {sum(n - 1 for n in interactions.values())}; "
        f"feedback {sum(feedback.values())}, lost {len(lost_feedback)}; spilled "
        f"{events.spilled}, dropped {events.dropped}\n"
        f"  learner ({behind} samples behind at the kill): {len(samples)} samples on the "
        f"topics, {found.applied} applied in "
        f"{found.versions} versions, duplicates {found.duplicates}, lost {found.lost}; "
        f"adapter-updates announces {len(versions)} versions with "
        f"{sum(versions.values())} samples"
    )
    assert len(ok) == len(calls)  # Generate 100 % available
    assert during > 0 and len(after) >= during + 100
    assert not lost and not lost_feedback and events.dropped == 0
    assert set(interactions) == set(served)
    assert samples == set(with_feedback)
    assert found.lost == 0 and found.duplicates == 0 and found.unknown == 0
    assert found.applied == len(samples)
    assert sum(versions.values()) == len(samples)  # each sample in exactly one version
    assert announced_versions(settings) == newest  # every version announced
