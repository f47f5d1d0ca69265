"""Retention against the real broker and a real server following the learner's versions:
old versions go once a newer one was announced longer ago than the grace, the newest ones
and the rollback guard's targets stay, the server never meets a missing version (it
re-reads versions from the store: one adapter slot, one cached adapter), and the newest
version still knows every sample learnt, so a replay from the start learns nothing twice.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import grpc
import pytest
from kafka import KafkaProducer

from loraloop.client import LoraLoopClient
from loraloop.core.adapters.opening import open_adapter_store
from loraloop.core.adapters.protocol import VersionStore
from loraloop.core.kafka.admin import ensure_loraloop_topics
from loraloop.learner.loop import Learner
from tests.faults.crash_support import USERS, EventStream, serving_settings
from tests.support import InProcessServer, drain_learner, isolated_settings

pytestmark = pytest.mark.kafka

GRACE_S = 2.0
KEEP = 2


class Callers:
    """Generate for every user, over and over, on a thread: each answer's version must be
    one the store had whole when it was served."""

    def __init__(self, client: LoraLoopClient, store: VersionStore) -> None:
        self.client, self.store = client, store
        self.served: dict[str, int] = {}
        self.errors: list[str] = []
        self.calls = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> Callers:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(60)

    def _run(self) -> None:
        while not self._stop.is_set():
            for user in USERS:
                try:
                    reply = self.client.generate(user, "Hello?", max_tokens=2, seed=0)
                except grpc.RpcError as exc:
                    self.errors.append(f"{user}: {exc}")
                    continue
                self.calls += 1
                before = self.served.get(user, 0)
                if reply.adapter_version < before:
                    self.errors.append(f"{user}: v{before}, then v{reply.adapter_version}")
                self.served[user] = reply.adapter_version


@pytest.mark.parametrize("kind", ["file", "s3"])
def test_old_versions_go_after_the_grace_and_nothing_served_or_learnt_is_lost(
    kafka_bootstrap: str, tmp_path: Path, kind: str, request: pytest.FixtureRequest
) -> None:
    """With the local store, and with the S3 store (SeaweedFS), the server fetching into
    a copy of its own."""
    on_s3: dict[str, object] = {}
    if kind == "s3":
        request.getfixturevalue("s3_env")
        on_s3 = {
            "adapter_store_uri": f"s3://adapters/retention-{tmp_path.name}",
            "adapter_cache_dir": tmp_path / "learner-copies",
        }
    settings = isolated_settings(
        kafka_bootstrap,
        tmp_path,
        adapter_keep_versions=KEEP,
        adapter_retention_grace_seconds=GRACE_S,
        adapter_slots=1,  # every switch of user loads an adapter again...
        host_cache_adapters=1,  # ...from the store
        **on_s3,
    )
    ensure_loraloop_topics(settings)
    ensure_loraloop_topics(serving_settings(settings))
    store = open_adapter_store(settings.model_copy(update={"adapter_cache_dir": tmp_path / "t"}))
    stream = EventStream(settings, KafkaProducer(bootstrap_servers=kafka_bootstrap))
    server_copies = {"adapter_cache_dir": tmp_path / "server-copies"}
    server = InProcessServer(serving_settings(settings).model_copy(update=server_copies))
    learner = Learner(settings, max_users_per_step=4)
    written: dict[str, list[int]] = {u: [] for u in USERS}
    try:
        learner.connect()
        with LoraLoopClient(server.target, timeout=60) as client, Callers(client, store) as calls:
            for r in range(10):
                stream.round(f"r{r}", per_user=1)
                # (the store's audit of every version cannot tell: old versions go)
                drain_learner(
                    learner, lambda: learner.stats["samples"] == stream.samples, f"round {r}", 90
                )
                for user in USERS:
                    newest = store.versions(user)[-1]
                    if newest not in written[user]:
                        written[user].append(newest)
                time.sleep(0.6)  # 10 rounds over ~8 s: versions outlive the 2 s grace
            time.sleep(GRACE_S)
            assert learner.consumer is not None
            for _ in range(5):  # the floors rise with the clock: the next rounds prune
                polled = learner.consumer.poll(timeout_ms=200)
                learner.process([rec for b in polled.values() for rec in b])
            floors = {u: learner.retention.floor(u) for u in USERS}
            time.sleep(1.0)  # the callers go on a while over the pruned store
        rejected = server.running.service.registry.rejected
        stats = dict(learner.stats)
    finally:
        learner.close()
        server.stop()
        stream.producer.close()

    kept = {u: store.versions(u) for u in USERS}
    print(
        f"\nretention (keep {KEEP}, grace {GRACE_S:.0f} s): {sum(map(len, written.values()))} "
        f"versions written, {stats['versions_retired']} deleted, kept {kept}; "
        f"{calls.calls} Generate calls meanwhile, {rejected} versions rejected by the server"
    )
    assert not calls.errors, calls.errors[:5]
    assert rejected == 0  # no server ever resolved a version that was gone
    assert stats["retention_failed"] == 0 and stats["versions_retired"] > 0
    for user in USERS:
        versions = kept[user]
        assert versions[-1] == written[user][-1]  # the newest stays
        assert len(versions) >= KEEP
        assert all(v in versions for v in written[user] if v >= floors[user])  # maybe served
        for v in versions:  # every rollback target of a kept version is kept
            best = store.learner_state(user, v)["guard"]["best_version"]
            assert best == 0 or best in versions, (user, v, best)

    # The newest version alone records every sample learnt: a learner in a new group that
    # reads every topic from the start learns nothing again.
    replay = Learner(
        settings.model_copy(update={"group_id": settings.group_id + "-replay"}),
        max_users_per_step=4,
    )
    try:
        replay.connect()
        deadline = time.monotonic() + 60
        while replay.stats["skipped_applied"] < stream.samples and time.monotonic() < deadline:
            assert replay.consumer is not None
            polled = replay.consumer.poll(timeout_ms=300)
            replay.process([rec for b in polled.values() for rec in b])
    finally:
        replay.close()
    assert replay.stats["skipped_applied"] == stream.samples
    assert replay.stats["versions"] == 0 and replay.stats["samples"] == 0
