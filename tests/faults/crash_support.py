"""What the learner crash tests share: a stream of events with known ids, a `loraloop learn`
process stopped dead at a crash point, and the audit of what the adapter store says each
version learnt from (the learner records it with every version, see learner/applied.py)."""

from __future__ import annotations

import collections
import re
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from kafka import KafkaConsumer, KafkaProducer, TopicPartition
from prometheus_client.parser import text_string_to_metric_families

from loraloop.client import LoraLoopClient
from loraloop.core.adapters.peft_format import read_peft_dir
from loraloop.core.adapters.store import AdapterStore
from loraloop.core.gen.loraloop.v1 import common_pb2, events_pb2
from loraloop.core.kafka.admin import ensure_loraloop_topics
from loraloop.core.settings import Settings
from tests.support import InProcessServer, Process, isolated_settings, read_topic, wait_until

USERS = ("ann", "ben", "cat", "dan")


@dataclass
class EventStream:
    """Interactions with their feedback, produced to the real broker; remembers every id."""

    settings: Settings
    producer: KafkaProducer
    produced: dict[str, list[str]] = field(default_factory=lambda: collections.defaultdict(list))
    records: int = 0

    def round(self, tag: str, per_user: int = 2) -> None:
        now = int(time.time() * 1000)
        for user in USERS:
            for k in range(per_user):
                rid = f"{user}-{tag}-{k}"
                self.send(user, rid, now, thumbs=1 if k % 2 == 0 else -1)
                self.produced[user].append(rid)
        self.producer.flush()

    def send(self, user: str, rid: str, ts: int, thumbs: int) -> None:
        interaction = events_pb2.Interaction(
            request_id=rid,
            user_id=user,
            timestamp_ms=ts,
            prompt_token_ids=[1, 40 + len(rid) % 7, 41, 42],
            response_token_ids=[50, 51 + ts % 5, 52, 2],
            behaviour_logprobs=[-1.5] * 4,
        )
        feedback = events_pb2.FeedbackEvent(
            request_id=rid,
            user_id=user,
            timestamp_ms=ts,
            signals=common_pb2.FeedbackSignals(thumbs=thumbs),
        )
        s, key = self.settings, user.encode()
        self.producer.send(s.topic_interactions, key=key, value=interaction.SerializeToString())
        self.producer.send(s.topic_feedback, key=key, value=feedback.SerializeToString())
        self.records += 2

    @property
    def samples(self) -> int:
        return sum(len(ids) for ids in self.produced.values())


def start_learner(
    settings: Settings, monkeypatch: pytest.MonkeyPatch, pause_at: str | None, marker: Path
) -> Process:
    """`loraloop learn` as a real process; with `pause_at` it stops dead at that crash point
    (loraloop/core/fault_points.py) and writes `marker`."""
    marker.unlink(missing_ok=True)
    with monkeypatch.context() as env:
        if pause_at:
            env.setenv("LORALOOP_FAULT_PAUSE_AT", pause_at)
            env.setenv("LORALOOP_FAULT_MARKER", str(marker))
        else:
            env.delenv("LORALOOP_FAULT_PAUSE_AT", raising=False)
        return Process(["learn"], settings, ready=r"learner consuming", timeout=120)


def kill_at(
    settings: Settings, monkeypatch: pytest.MonkeyPatch, pause_at: str, marker: Path
) -> float:
    """Start a learner, wait until it stands at `pause_at`, SIGKILL it; seconds it ran."""
    started = time.monotonic()
    learner = start_learner(settings, monkeypatch, pause_at, marker)
    try:
        wait_until(marker.exists, 90, f"the learner to reach {pause_at}\n{learner.output}")
        assert marker.read_text() == pause_at.partition("@")[0]
    finally:
        learner.kill()  # SIGKILL: no handler, no flush, no offset commit
    assert learner.proc.returncode == -9
    return time.monotonic() - started


@dataclass
class Audit:
    applied: int
    duplicates: int
    lost: int
    unknown: int
    versions: int


def audit(store: AdapterStore, produced: dict[str, list[str]]) -> Audit:
    """What every stored version says it learnt from, against what was produced."""
    applied = duplicates = lost = unknown = versions = 0
    for user, ids in produced.items():
        learnt: list[str] = []
        positions: list[str] = []
        for version in store.versions(user):
            versions += 1
            for rid, position in store.learner_state(user, version)["learnt_from"]:
                learnt.append(rid)
                positions.append(position)
        applied += len(learnt)
        # a sample applied twice repeats its request_id and its Kafka position
        duplicates += max(len(learnt) - len(set(learnt)), len(positions) - len(set(positions)))
        lost += len(set(ids) - set(learnt))
        unknown += len(set(learnt) - set(ids))
    return Audit(applied, duplicates, lost, unknown, versions)


def all_applied(store: AdapterStore, produced: dict[str, list[str]]) -> bool:
    return audit(store, produced).lost == 0


def committed_to_end(settings: Settings) -> bool:
    """The learner group's committed offsets are at the end of every partition it reads
    (asked without joining the group: `committed` only fetches offsets)."""
    s = settings
    consumer = KafkaConsumer(
        bootstrap_servers=s.kafka_bootstrap, group_id=s.group_id, enable_auto_commit=False
    )
    try:
        topics = (s.topic_interactions, s.topic_feedback, s.topic_adapter_updates)
        parts = [
            TopicPartition(t, p) for t in topics for p in consumer.partitions_for_topic(t) or ()
        ]
        ends = consumer.end_offsets(parts)
        return all(end == 0 or consumer.committed(tp) == end for tp, end in ends.items())
    finally:
        consumer.close()


def announced_versions(settings: Settings) -> dict[str, int]:
    """The newest version adapter-updates announces per user."""
    newest: dict[str, int] = {}
    for record in read_topic(settings.kafka_bootstrap, settings.topic_adapter_updates):
        if record.value:
            event = events_pb2.AdapterUpdated.FromString(record.value)
            newest[event.user_id] = max(newest.get(event.user_id, 0), event.version)
    return newest


def scrape(learner: Process) -> dict[str, float]:
    """The learner process's /metrics, as {"name{label=value}": value}."""
    found = re.search(r"learner metrics on ([\d.]+):(\d+)", "".join(learner.lines))
    assert found, learner.output
    with urllib.request.urlopen(f"http://{found.group(1)}:{found.group(2)}/metrics") as reply:
        text = reply.read().decode()
    values = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(sample.labels.items()))
            values[f"{sample.name}{{{labels}}}" if labels else sample.name] = sample.value
    return values


def serving_settings(settings: Settings) -> Settings:
    """The same adapter store and adapter-updates topic, but the server's own interactions
    go to topics of their own: the crash tests' learner sees only the events they produce."""
    return settings.model_copy(
        update={
            "topic_interactions": settings.topic_interactions + "-served",
            "topic_feedback": settings.topic_feedback + "-served",
        }
    )


def check_serving(client: LoraLoopClient, store: AdapterStore, served: dict[str, int]) -> None:
    """Every user's response comes from a whole, readable version (or the base model) and
    never from an older version than this server served that user before."""
    for user in USERS:
        reply = client.generate(user, "How do I cook pasta?", max_tokens=2, seed=0)
        version, before = reply.adapter_version, served.get(user, 0)
        assert version >= before, f"{user} was served v{before}, then v{version}"
        if version:
            assert version in store.versions(user)
            read_peft_dir(store.version_dir(user, version))  # complete, checksum intact
        served[user] = version


def catch_up(
    settings: Settings,
    monkeypatch: pytest.MonkeyPatch,
    marker: Path,
    stream: EventStream,
    store: AdapterStore,
) -> tuple[float, dict[str, float]]:
    """Restart the learner without a crash point and wait until every produced sample is in
    the store and the group's offsets are committed to the end: (seconds, its metrics)."""
    started = time.monotonic()
    learner = start_learner(settings, monkeypatch, None, marker)
    try:
        wait_until(
            lambda: all_applied(store, stream.produced) and committed_to_end(settings),
            120,
            f"the restarted learner to catch up\n{learner.output}",
        )
        seconds = time.monotonic() - started
        metrics = scrape(learner)
    finally:
        returncode = learner.stop()  # checked below: an assert here would hide the failure
    assert returncode == 0, learner.output
    return seconds, metrics


@dataclass
class CrashWorld:
    """Topics, store, event stream and a serving client for one crash test."""

    settings: Settings
    store: AdapterStore
    stream: EventStream
    client: LoraLoopClient
    marker: Path  # where a learner paused at a crash point says so
    served: dict[str, int] = field(default_factory=dict)  # user -> newest version served


@contextmanager
def crash_world(kafka_bootstrap: str, tmp_path: Path) -> Iterator[CrashWorld]:
    """Isolated topics and store, a producer of known events and a real server following
    the learner's versions; all closed afterwards."""
    settings = isolated_settings(
        kafka_bootstrap, tmp_path, learner_session_timeout_seconds=6, learner_metrics_port=0
    )
    ensure_loraloop_topics(settings)
    ensure_loraloop_topics(serving_settings(settings))
    stream = EventStream(settings, KafkaProducer(bootstrap_servers=kafka_bootstrap))
    server = InProcessServer(serving_settings(settings))
    try:
        with LoraLoopClient(server.target, timeout=60) as client:
            store = AdapterStore(settings.adapter_store)
            yield CrashWorld(settings, store, stream, client, tmp_path / "paused-at")
    finally:
        server.stop()
        stream.producer.close()
