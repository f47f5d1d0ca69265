"""A `loraloop serve` process killed (-9) and restarted rebuilds its view of adapter versions
from the compacted adapter-updates topic and the adapter store, and never answers a user
with an older version than it answered them with before the restart, including a version
the topic does not know about (its learner was killed between writing and announcing it).
"""

from __future__ import annotations

import urllib.request
from pathlib import Path

import pytest
from kafka import KafkaProducer
from prometheus_client.parser import text_string_to_metric_families

from loraloop.client import LoraLoopClient
from loraloop.core.adapters.store import AdapterStore
from loraloop.core.kafka.admin import ensure_loraloop_topics
from loraloop.learner.loop import Learner
from tests.faults.crash_support import (
    USERS,
    EventStream,
    announced_versions,
    check_serving,
    kill_at,
    serving_settings,
)
from tests.support import Process, isolated_settings, wait_until

pytestmark = pytest.mark.kafka


def _serve(settings) -> tuple[Process, LoraLoopClient]:
    server = Process(["serve"], settings, ready=r"listening on [\d.]+:(\d+)", timeout=120)
    assert server.match is not None
    client = LoraLoopClient(f"127.0.0.1:{server.match.group(1)}", timeout=60)
    client.wait_ready()
    return server, client


def _metric(server: Process, name: str) -> float:
    port = next(
        line.rsplit(":", 1)[1].strip() for line in server.lines if "server metrics on" in line
    )
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics") as reply:
        text = reply.read().decode()
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name:
                return sample.value
    raise AssertionError(f"no {name} in the server's metrics")


def test_restarted_server_never_serves_an_older_version(
    kafka_bootstrap: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = isolated_settings(
        kafka_bootstrap, tmp_path, learner_session_timeout_seconds=6, server_metrics_port=0
    )
    ensure_loraloop_topics(settings)
    ensure_loraloop_topics(serving_settings(settings))
    store = AdapterStore(settings.adapter_store)
    stream = EventStream(settings, KafkaProducer(bootstrap_servers=kafka_bootstrap))

    # v1 of every user, written and announced by a learner that then stops cleanly
    learner = Learner(settings, max_users_per_step=8)
    learner.connect()
    stream.round("r0", per_user=1)
    for _ in range(12):
        polled = learner.consumer.poll(timeout_ms=250) if learner.consumer else {}
        learner.process([r for batch in polled.values() for r in batch])
    learner.close()
    assert all(store.versions(u) == [1] for u in USERS)

    # a learner killed between writing a user's v2 and announcing it
    stream.round("r1", per_user=1)
    kill_at(settings, monkeypatch, "learner.after_write@1", tmp_path / "paused-at")
    announced = announced_versions(settings)
    hidden = [u for u in USERS if store.versions(u)[-1] > announced[u]]
    assert len(hidden) == 1, (announced, {u: store.versions(u) for u in USERS})

    served: dict[str, int] = {}
    server, client = _serve(serving_settings(settings))
    try:
        check_serving(client, store, served)
        assert served == {u: store.versions(u)[-1] for u in USERS}  # v2 of the hidden user too
    finally:
        client.close()
        server.kill()  # a crash: no drain, no goodbye
    before = dict(served)

    server, client = _serve(serving_settings(settings))
    try:
        # at once (the topic perhaps not replayed yet), then with the view rebuilt from it:
        # check_serving asserts no user is ever answered with an older version than before
        early = _metric(server, "loraloop_server_adapter_view_caught_up")
        check_serving(client, store, served)
        wait_until(
            lambda: _metric(server, "loraloop_server_adapter_view_caught_up") == 1,
            30,
            "the restarted server to replay adapter-updates",
        )
        check_serving(client, store, served)
        view = _metric(server, "loraloop_server_adapter_updates_total")
    finally:
        client.close()
        assert server.stop() == 0, server.output
    print(
        f"server killed and restarted: versions served before {before}, after {served}; "
        f"{view:.0f} adapter updates replayed from the compacted topic (first requests "
        f"{'after' if early else 'before'} the replay ended); {hidden[0]}'s "
        f"v{served[hidden[0]]} came from the store alone"
    )
    assert served == before
    assert view >= len(USERS)
