"""A corrupt or truncated adapter version in the store, with real files, the real server and
the real learner: serving keeps the previous version (and says so in its log and metrics);
the learner, finding its own newest version unreadable, learns on from the newest one that
reads instead of crashing (log and metric too)."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import pytest
import torch
from kafka import KafkaProducer
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from loraloop.client import LoraLoopClient, Reply
from loraloop.core.adapters.peft_format import read_peft_dir, to_peft_files
from loraloop.core.adapters.store import AdapterStore
from loraloop.core.adapters.version import ADAPTER_WEIGHTS, AdapterVersion
from loraloop.core.gen.loraloop.v1 import events_pb2
from loraloop.core.kafka.admin import ensure_loraloop_topics
from loraloop.core.multi_lora import LoRAWeights
from loraloop.core.settings import Settings
from loraloop.learner.loop import Learner
from loraloop.learner.user_models import initial_weights
from loraloop.service.adapters.registry import AdapterRegistry
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


def _truncate(stored: AdapterVersion) -> None:
    weights = stored.path / ADAPTER_WEIGHTS
    weights.write_bytes(weights.read_bytes()[:100])


def _flip_a_byte(stored: AdapterVersion) -> None:
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

    def write(self, user: str, version: int, corrupt=None) -> AdapterVersion:
        weights = LoRAWeights(self.shapes.rank, self.shapes.alpha)
        gen = torch.Generator().manual_seed(version)
        for name, a in self.shapes.a.items():
            weights.a[name] = a.clone()
            weights.b[name] = torch.randn(self.shapes.b[name].shape, generator=gen) * 0.01
        base = self.settings.model_id or self.settings.model  # what the server serves
        files = to_peft_files(weights, base, self.settings.lora_targets)
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
            rejected = _counter(
                metrics.registry,
                "loraloop_server_adapter_versions_rejected_total",
                kind="integrity",
            )
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


def _in_place_of_weights(stored: AdapterVersion) -> None:
    """The weights file replaced by a directory: reading it is an OSError (as EIO or EMFILE
    would be), not a sign the version is corrupt."""
    weights = stored.path / ADAPTER_WEIGHTS
    weights.rename(stored.path / "weights.aside")
    weights.mkdir()


def _restore_weights(stored: AdapterVersion) -> None:
    weights = stored.path / ADAPTER_WEIGHTS
    weights.rmdir()
    (stored.path / "weights.aside").rename(weights)


def test_transient_failures_are_retried_and_deletion_forgets_rejections(
    kafka_bootstrap: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A version that fails with an OSError is served again once its retry is due (here
    after 1 s) and the files read; a corrupt one stays rejected until the user is deleted,
    after which a new v1 of theirs is served."""
    settings = isolated_settings(kafka_bootstrap, tmp_path)
    ensure_loraloop_topics(settings)
    server = InProcessServer(settings)
    service = server.running.service
    registry = service.registry
    registry.retry_s = 1.0
    publish = Publisher(settings, initial_weights(service.engine.lm.bank, "shape", 0))
    seen = registry.updates_seen

    def announced(n: int) -> None:
        wait_until(lambda: registry.updates_seen >= seen + n, 30, f"{n} adapter updates")

    try:
        with LoraLoopClient(server.target, timeout=60) as client, caplog.at_level(logging.INFO):
            publish.write("cy", 1)
            flaky = publish.write("cy", 2, corrupt=_in_place_of_weights)
            announced(2)
            assert _served(client, "cy") == 1  # v2 fails to read: v1 answers meanwhile
            assert registry.transient_rejections == 1 and registry.rejections_held("cy") == 1
            _restore_weights(flaky)  # the disk answers again
            tries = 0

            def v2_served() -> bool:
                nonlocal tries
                tries += 1
                return _served(client, "cy") == 2

            wait_until(v2_served, 30, "v2 to be tried again and served")
            assert registry.rejections_held("cy") == 0

            publish.write("dee", 1, corrupt=_truncate)  # an integrity error: for good
            announced(3)
            assert _served(client, "dee") == 0 and registry.rejections_held("dee") == 1
            assert client.delete_user("dee")
            assert registry.rejections_held("dee") == 0
            service.events.flush()  # the tombstone goes before the new version
            publish.store.delete_user("dee")  # (the learner's part of the deletion)
            publish.write("dee", 1)
            wait_until(lambda: registry.resolve("dee") is not None, 30, "dee's new v1")
            assert _served(client, "dee") == 1  # the new v1 is served, not refused forever
    finally:
        server.stop()
    retried = [r.getMessage() for r in caplog.records if "trying it again" in r.getMessage()]
    print(
        f"transient load failure: v2 served again after {tries} request(s) once the retry was "
        f"due; {registry.rejected} rejections in all; deleted user's new v1 served"
    )
    assert retried and all(
        r.levelno < logging.ERROR for r in caplog.records if "adapter cy" in r.getMessage()
    )


def test_an_update_must_name_its_own_version_directory(
    kafka_bootstrap: str, tmp_path: Path
) -> None:
    """The URI of an AdapterUpdated must be the store directory of exactly the version it
    announces: not another version, the user's directory, or a temporary directory."""
    settings = isolated_settings(kafka_bootstrap, tmp_path)
    store = AdapterStore(settings.adapter_store)
    registry = AdapterRegistry(store, kafka_bootstrap, settings.topic_adapter_updates)

    def event(version: int, path: Path) -> events_pb2.AdapterUpdated:
        return events_pb2.AdapterUpdated(user_id="eve", version=version, uri=path.as_uri())

    refused = {
        "another version": event(2, store.version_dir("eve", 1)),
        "the user directory": event(2, store.user_dir("eve")),
        "a temporary directory": event(2, store.user_dir("eve") / ".v2.tmp-123"),
        "another user's version": event(1, store.version_dir("fay", 1)),
        "a path walking back in": event(2, store.version_dir("eve", 1) / ".." / "v3"),
    }
    for what, bad in refused.items():
        with pytest.raises(ValueError, match="is not the store directory"):
            registry.apply("eve", bad)
        assert registry.resolve("eve") is None, what
    assert registry.apply("eve", event(1, store.version_dir("eve", 1)))
    assert registry.resolve("eve") is not None
    print(f"adapter updates refused for naming the wrong directory: {len(refused)}")


def test_user_state_with_unreadable_learner_state_falls_back(
    kafka_bootstrap: str, tmp_path: Path
) -> None:
    """GetUserState over a corrupt learner_state.json answers with the next older state
    that reads, or zeros; never INTERNAL."""
    settings = isolated_settings(kafka_bootstrap, tmp_path)
    ensure_loraloop_topics(settings)
    server = InProcessServer(settings)
    registry = server.running.service.registry
    publish = Publisher(settings, initial_weights(server.running.service.engine.lm.bank, "s", 0))
    seen = registry.updates_seen
    try:
        with LoraLoopClient(server.target, timeout=60) as client:
            v1, v2 = publish.write("gus", 1), publish.write("gus", 2)
            wait_until(lambda: registry.updates_seen >= seen + 2, 30, "2 adapter updates")
            assert client.user_state("gus").updates == 2
            (v2.path / "learner_state.json").write_text("{not json")
            older = client.user_state("gus")
            (v1.path / "learner_state.json").write_text("[1, 2]")  # JSON, not an object
            neither = client.user_state("gus")
    finally:
        server.stop()
    print(f"user state over corrupt learner states: {older.updates} (v1's), then zeros")
    assert (older.adapter_version, older.updates) == (2, 1)
    assert (neither.adapter_version, neither.updates, neither.recent_reward) == (2, 0, 0.0)


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
    with caplog.at_level(logging.ERROR, logger="loraloop.learner.user_models"):
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


def test_a_version_that_keeps_failing_is_retried_less_and_less_often(tmp_path: Path) -> None:
    """Each transient failure of the same version doubles its pause (up to 16x), so a
    version that never loads costs one failed try per 16 pauses, not one per pause."""
    registry = AdapterRegistry(AdapterStore(tmp_path), "127.0.0.1:1", "unused-topic")
    registry.retry_s = 10.0
    ref = AdapterVersion("fay", 3, tmp_path / "fay" / "v3")
    pauses = []
    for _ in range(7):
        registry.reject(ref, "EIO", transient=True)
        pauses.append(round(registry._rejected[("fay", 3)] - time.monotonic()))
        registry._rejected[("fay", 3)] = 0.0  # the pause is over: the next try fails again
    print(f"pauses between tries of a version that keeps failing: {pauses} s")
    assert pauses == [10, 20, 40, 80, 160, 160, 160]
    registry.forget("fay")
    registry.reject(ref, "EIO", transient=True)  # a deleted user's new v3 starts afresh
    assert round(registry._rejected[("fay", 3)] - time.monotonic()) == 10
