"""kill -9 of a real `loraloop learn` process while it writes an adapter version, twice, then
a restart: what the killed writer left is never listed, never served, and swept by the next
write; every feedback event is applied exactly once.

The crash points (core/fault_points.py):
- store.mid_write: part of the version's files written into its temporary directory;
- store.before_rename: every file written and fsynced, the directory not yet renamed.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from kafka import KafkaProducer

from core.adapter_store import AdapterStore
from core.kafka.broker import ensure_loraloop_topics
from loraloop.client import LoraLoopClient
from tests.faults.crash_support import (
    USERS,
    EventStream,
    audit,
    catch_up,
    check_serving,
    kill_at,
    serving_settings,
)
from tests.support import InProcessServer, isolated_settings

pytestmark = pytest.mark.kafka

CRASHES = ("store.mid_write@2", "store.before_rename@3")


def test_learner_killed_while_writing_a_version_leaves_nothing_visible(
    kafka_bootstrap: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = isolated_settings(
        kafka_bootstrap, tmp_path, learner_session_timeout_seconds=6, learner_metrics_port=0
    )
    ensure_loraloop_topics(settings)
    ensure_loraloop_topics(serving_settings(settings))
    store = AdapterStore(settings.adapter_store)
    stream = EventStream(settings, KafkaProducer(bootstrap_servers=kafka_bootstrap))
    marker = tmp_path / "paused-at"
    served: dict[str, int] = {}
    server = InProcessServer(serving_settings(settings))
    try:
        with LoraLoopClient(server.target, timeout=60) as client:
            for i, point in enumerate(CRASHES):
                stream.round(f"r{i}")
                ran = kill_at(settings, monkeypatch, point, marker)
                partial = {u: [p.name for p in store.partial_writes(u)] for u in USERS}
                partial = {u: names for u, names in partial.items() if names}
                assert partial, "the kill should have left a half-written version behind"
                for user, names in partial.items():
                    for name in names:  # `.v<N>.<random>`: v<N> is not a version (yet)
                        assert int(name.split(".")[1][1:]) not in store.versions(user)
                check_serving(client, store, served)  # whole versions only, never older
                print(f"killed at {point} after {ran:.1f} s; half-written: {partial}")
            stream.round("final")
            seconds, _ = catch_up(settings, monkeypatch, marker, stream, store)
            check_serving(client, store, served)
    finally:
        server.stop()
        stream.producer.close()

    result = audit(store, stream.produced)
    print(
        f"learner killed {len(CRASHES)}x mid-write: {stream.records} events produced "
        f"({stream.samples} samples), {result.applied} applied in {result.versions} versions, "
        f"duplicates {result.duplicates}, lost {result.lost}; caught up in {seconds:.1f} s "
        "after the restart (process start, model load and group rejoin included)"
    )
    assert result.duplicates == 0 and result.lost == 0 and result.unknown == 0
    assert result.applied == stream.samples
    assert all(not store.partial_writes(u) for u in USERS)  # swept by the rewrite
