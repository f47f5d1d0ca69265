"""A corrupt or truncated adapter version in the store, with real files, the real server and
the real learner: serving keeps the previous version (and says so in its log and metrics);
the learner, finding its own newest version unreadable, learns on from the newest one that
reads instead of crashing (log and metric too)."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
from kafka import KafkaProducer
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from core.adapter_store import ADAPTER_WEIGHTS, AdapterStore, StoredVersion
from core.gen.loraloop.v1 import events_pb2
from core.kafka.broker import ensure_loraloop_topics
from core.multi_lora import LoRAWeights
from core.peft_format import read_peft_dir, to_peft_files
from core.settings import Settings
from learner.loop import Learner
from learner.user_models import initial_weights
from loraloop.client import LoraLoopClient, Reply
from tests.faults.crash_support import EventStream
from tests.support import InProcessServer, isolated_settings, wait_until

pytestmark = pytest.mark.kafka
PROMPT = "How do I cook pasta?"


def _counter(registry, name: str, **labels: str) -> float:
    for family in text_string_to_metric_families(generate_latest(registry).decode()):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return sample.value
    raise AssertionError(f"no {name}{labels} in the metrics")


def _truncate(stored: StoredVersion) -> None:
    weights = stored.path / ADAPTER_WEIGHTS
    weights.write_bytes(weights.read_bytes()[:100])


def _flip_a_byte(stored: StoredVersion) -> None:
    """One flipped bit deep in the tensor data: safetensors still parses, the checksum fails."""
    weights = stored.path / ADAPTER_WEIGHTS
    data = bytearray(weights.read_bytes())
    data[-10] ^= 0x01
    weights.write_bytes(bytes(data))


class Publisher:
    """Writes adapter versions into the store and announces them, as the learner does."""

    def __init__(self, settings: Settings, shapes: LoRAWeights) -> None:
        self.settings = settings
        self.store = AdapterStore(settings.adapter_store)
        self.shapes = shapes
        self.producer = KafkaProducer(bootstrap_servers=settings.kafka_bootstrap)

    def write(self, user: str, version: int, corrupt=None) -> StoredVersion:
        weights = LoRAWeights(self.shapes.rank, self.shapes.alpha)
        gen = torch.Generator().manual_seed(version)
        for name, a in self.shapes.a.items():
            weights.a[name] = a.clone()
            weights.b[name] = torch.randn(self.shapes.b[name].shape, generator=gen) * 0.01
        files = to_peft_files(weights, "tiny", self.settings.lora_targets)
        stored = self.store.write(user, version, files, {"updates": version})
        checksum = stored.checksum
        if corrupt is not None:
            corrupt(stored)
        event = events_pb2.AdapterUpdated(
            user_id=user, version=version, uri=stored.uri, checksum=checksum
        )
        self.producer.send(
            self.settings.topic_adapter_updates, key=user.encode(), value=event.SerializeToString()
        )
        self.producer.flush()
        return stored


def _served(client: LoraLoopClient, user: str, stream: bool = False) -> int:
    if stream:
        *_, final = client.stream(user, PROMPT, max_tokens=3, seed=1)
        assert isinstance(final, Reply)
        return final.adapter_version
    return client.generate(user, PROMPT, max_tokens=3, seed=1).adapter_version


def test_serving_keeps_the_previous_version_when_the_new_one_is_corrupt(
    kafka_bootstrap: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    settings = isolated_settings(kafka_bootstrap, tmp_path)
    ensure_loraloop_topics(settings)
    server = InProcessServer(settings)
    registry = server.running.service.registry
    metrics = server.running.metrics
    assert metrics is not None
    engine = server.running.service.engine
    publish = Publisher(settings, initial_weights(engine.lm.bank, "shape", 0))
    seen = registry.updates_seen

    def announced(n: int) -> None:
        wait_until(lambda: registry.updates_seen >= seen + n, 30, f"{n} adapter updates")

    try:
        with LoraLoopClient(server.target, timeout=60) as client, caplog.at_level(logging.ERROR):
            publish.write("amy", 1)
            publish.write("amy", 2)
            announced(2)
            assert _served(client, "amy") == 2

            publish.write("amy", 3, corrupt=_truncate)
            announced(3)
            assert _served(client, "amy") == 2  # v3 does not load: v2 answers
            assert _served(client, "amy") == 2  # and v3 is not tried again
            publish.write("amy", 4, corrupt=_flip_a_byte)
            announced(4)
            assert _served(client, "amy", stream=True) == 2  # past v4 and v3, streaming too
            publish.write("amy", 5)
            announced(5)
            assert _served(client, "amy") == 5  # a good version is served as soon as it comes

            publish.write("bea", 1, corrupt=_truncate)  # nothing older: the base model
            announced(6)
            assert _served(client, "bea") == 0
            rejected = _counter(metrics.registry, "loraloop_server_adapter_versions_rejected_total")
            load_errors = _counter(
                metrics.registry, "loraloop_server_adapter_loads_total", result="error"
            )
    finally:
        server.stop()
    logged = [r.getMessage() for r in caplog.records if "cannot be served" in r.getMessage()]
    print(
        f"corrupt versions: 3 announced, {rejected:.0f} rejected by serving, "
        f"{load_errors:.0f} load errors counted, {len(logged)} logged; every request answered"
    )
    assert rejected == 3 and load_errors == 3
    assert len(logged) == 3 and any("does not match its recorded SHA-256" in m for m in logged)


def _drain(learner: Learner, rounds: int = 12) -> None:
    assert learner.consumer is not None
    for _ in range(rounds):
        polled = learner.consumer.poll(timeout_ms=250)
        learner.process([r for batch in polled.values() for r in batch])


def test_learner_learns_on_from_the_last_good_version_when_its_newest_is_corrupt(
    kafka_bootstrap: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    settings = isolated_settings(kafka_bootstrap, tmp_path)
    store = AdapterStore(settings.adapter_store)
    stream = EventStream(settings, KafkaProducer(bootstrap_servers=kafka_bootstrap))
    first = Learner(settings, max_users_per_step=4)
    first.connect()
    for tag in ("a", "b"):  # two rounds: v1 and v2 for every user
        stream.round(tag, per_user=1)
        _drain(first, rounds=8)
    first.close()
    assert store.versions("ann") == [1, 2]
    good = read_peft_dir(store.get("ann", 1).path)
    _truncate(store.get("ann", 2))  # the learner's own newest version is now unreadable
    (store.version_dir("ben", 2) / "learner_state.json").write_text("{not json")

    stream.round("c", per_user=1)
    second = Learner(settings, max_users_per_step=4)  # a restart: nothing cached
    second.connect()
    with caplog.at_level(logging.ERROR, logger="learner.user_models"):
        _drain(second)
    unreadable = _counter(
        second.metrics.registry, "loraloop_learner_adapter_versions_unreadable_total"
    )
    second.close()

    # ann learnt on from v1 (the newest version that reads) and wrote v3 after v2
    assert store.versions("ann") == [1, 2, 3]
    assert all(torch.equal(second.users.weights_of("ann", 2).b[n], good.b[n]) for n in good.b)
    # ben's v2 weights read, its state did not: v1's state stands in, nothing is lost
    assert store.versions("ben") == [1, 2, 3]
    assert {rid for rid, _ in store.learner_state("ann", 3)["learnt_from"]} == {"ann-c-0"}
    logged = [r for r in caplog.records if "is unreadable" in r.getMessage()]
    print(
        f"learner restarted on 2 corrupt versions: {unreadable:.0f} counted unreadable, "
        f"{len(logged)} logged, {second.stats['versions']} new versions written, no crash"
    )
    assert unreadable == 2 and len(logged) == 2
    assert second.stats["versions"] == 4  # every user moved on
