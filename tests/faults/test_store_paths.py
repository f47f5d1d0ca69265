"""Adapter paths cannot leave the store: traversal-ish user ids are refused by the store
API, by every RPC and by the learner (a poisoned event is skipped, not fatal), a valid id
always names one direct child of the store root, and an adapter-updates event cannot point
the server at files outside the user's store directory."""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from kafka import KafkaProducer

from loraloop.core.adapters.store import AdapterStore
from loraloop.core.adapters.version import ADAPTER_WEIGHTS
from loraloop.core.gen.loraloop.v1 import api_pb2, api_pb2_grpc, common_pb2, events_pb2
from loraloop.core.kafka.admin import ensure_loraloop_topics
from loraloop.core.user_ids import user_id_error
from loraloop.learner.loop import Learner
from loraloop.service.adapters.registry import AdapterRegistry
from tests.support import InProcessServer, isolated_settings

BAD_IDS = [
    "../x",
    "a/../../b",
    "..",
    ".",
    "%2e%2e",
    "%2e%2e%2fetc",
    "..%2f..%2fetc",
    "a\x00b",
    "\x00",
    "/etc/passwd",
    "a/b",
    "a\\..\\b",
    "~root",
    "x" * 129,
    "y" * 10_000,
    "caf\u00e9",
    "\u2025",  # two-dot leader
    "a\nb",
    "",
]


def _tree(path: Path) -> set[str]:
    return {str(p.relative_to(path)) for p in path.rglob("*")}


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_store_api_refuses_every_bad_id(tmp_path: Path) -> None:
    root = tmp_path / "nested" / "store"
    store = AdapterStore(root)
    before = _tree(tmp_path)
    files = {ADAPTER_WEIGHTS: b"weights"}
    calls = {
        "user_dir": lambda u: store.user_dir(u),
        "version_dir": lambda u: store.version_dir(u, 1),
        "versions": lambda u: store.versions(u),
        "latest": lambda u: store.latest(u),
        "get": lambda u: store.get(u, 1),
        "write": lambda u: store.write(u, 1, files, {"x": 1}),
        "learner_state": lambda u: store.learner_state(u, 1),
        "delete_user": lambda u: store.delete_user(u),
    }
    refused = 0
    for user_id in BAD_IDS:
        assert user_id_error(user_id), repr(user_id)
        for call in calls.values():
            with pytest.raises(ValueError):
                call(user_id)
            refused += 1
    assert _tree(tmp_path) == before  # nothing written anywhere, in or out of the store
    print(f"\nstore API: {refused} calls with {len(BAD_IDS)} bad user ids refused, 0 files written")


@pytest.fixture(scope="module")
def empty_store(tmp_path_factory: pytest.TempPathFactory) -> AdapterStore:
    return AdapterStore(tmp_path_factory.mktemp("arithmetic") / "store")


@settings(max_examples=400, deadline=None)
@given(user_id=st.text(max_size=140))
def test_every_accepted_id_is_one_directory_inside_the_root(
    empty_store: AdapterStore, user_id: str
) -> None:
    root = empty_store.root
    if user_id_error(user_id):
        with pytest.raises(ValueError):
            empty_store.user_dir(user_id)
        return
    path = empty_store.user_dir(user_id)
    assert path.parent == root and path.name == user_id
    assert os.path.normpath(path) == str(path)  # no '.', '..' or separators inside


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, InProcessServer]]:
    tmp = tmp_path_factory.mktemp("paths")
    settings = isolated_settings(f"127.0.0.1:{_closed_port()}", tmp / "inside")
    served = InProcessServer(settings)
    yield tmp, served
    served.stop()


def test_every_rpc_refuses_bad_ids(server) -> None:
    tmp, served = server
    before = _tree(tmp)
    with grpc.insecure_channel(served.target) as channel:
        stub = api_pb2_grpc.LoraLoopStub(channel)
        for user_id in BAD_IDS:
            gen = api_pb2.GenerateRequest(user_id=user_id, prompt="hi")
            feedback = api_pb2.FeedbackRequest(
                user_id=user_id,
                request_id="0" * 24 + "." + "0" * 24,
                signals=common_pb2.FeedbackSignals(thumbs=1),
            )
            calls = [
                lambda r=gen: stub.Generate(r, timeout=30),
                lambda r=gen: list(stub.GenerateStream(r, timeout=30)),
                lambda r=feedback: stub.Feedback(r, timeout=30),
                lambda u=user_id: stub.GetUserState(
                    api_pb2.GetUserStateRequest(user_id=u), timeout=30
                ),
                lambda u=user_id: stub.DeleteUser(api_pb2.DeleteUserRequest(user_id=u), timeout=30),
            ]
            for call in calls:
                with pytest.raises(grpc.RpcError) as info:
                    call()
                assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, repr(user_id)
                assert "user_id" in (info.value.details() or "")
        # the server is unharmed and writes nothing for anyone
        assert stub.Generate(api_pb2.GenerateRequest(user_id="ok", prompt="hi"), timeout=60)
    assert _tree(tmp) == before
    print(f"\ngRPC: {len(BAD_IDS) * 5} calls with bad user ids -> INVALID_ARGUMENT, 0 files")


def test_registry_reads_adapters_only_inside_the_users_directory(tmp_path: Path) -> None:
    store = AdapterStore(tmp_path / "store")
    good = store.write("alice", 1, {ADAPTER_WEIGHTS: b"w"})
    outside = tmp_path / "elsewhere" / "v2"
    outside.mkdir(parents=True)
    registry = AdapterRegistry(store, f"127.0.0.1:{_closed_port()}", "unused")  # not started

    def record(user: bytes, version: int, uri: str) -> None:
        event = events_pb2.AdapterUpdated(user_id=user.decode(), version=version, uri=uri)
        registry._on_record("adapter-updates", user, event.SerializeToString())

    record(b"alice", 1, good.uri)
    assert registry.resolve("alice").version == 1
    record(b"alice", 2, outside.as_uri())  # a path outside the store
    record(b"alice", 3, (store.root / "bob" / "v3").as_uri())  # another user's directory
    record(b"alice", 4, (store.root / "alice" / ".." / "bob" / "v4").as_uri())
    record(b"../x", 5, (store.root / ".." / "x" / "v5").as_uri())  # a traversal key
    assert registry.resolve("alice").version == 1
    assert "../x" not in registry._latest


@pytest.mark.kafka
def test_learner_skips_events_with_unsafe_user_ids(kafka_bootstrap: str, tmp_path: Path) -> None:
    settings_ = isolated_settings(kafka_bootstrap, tmp_path / "inside")
    ensure_loraloop_topics(settings_)
    learner = Learner(settings_, max_users_per_step=2)
    learner.connect()
    producer = KafkaProducer(bootstrap_servers=kafka_bootstrap)
    users = ["../escaped", "a/../../b", "%2e%2e", "a\x00b", "z" * 300, "fine"]
    for n, user in enumerate(users):
        rid = f"r{n}"
        interaction = events_pb2.Interaction(
            request_id=rid,
            user_id=user,
            timestamp_ms=int(time.time() * 1000),
            prompt_token_ids=[1, 40, 41],
            response_token_ids=[50, 51, 2],
            behaviour_logprobs=[-1.0] * 3,
        )
        feedback = events_pb2.FeedbackEvent(
            request_id=rid, user_id=user, signals=common_pb2.FeedbackSignals(thumbs=1)
        )
        producer.send(settings_.topic_interactions, value=interaction.SerializeToString())
        producer.send(settings_.topic_feedback, value=feedback.SerializeToString())
    producer.send(settings_.topic_adapter_updates, key=b"../../outside", value=None)
    producer.flush()
    producer.close()
    store = AdapterStore(settings_.adapter_store)
    deadline = time.monotonic() + 60
    assert learner.consumer is not None
    while not store.versions("fine") and time.monotonic() < deadline:
        polled = learner.consumer.poll(timeout_ms=300)
        learner.process([r for batch in polled.values() for r in batch])  # never raises
    learner.close()
    assert store.versions("fine") == [1]
    assert learner.stats["malformed"] == 2 * (len(users) - 1)
    root = store.root.resolve()
    for path in tmp_path.rglob("*"):
        real = path.resolve()
        assert real == root or root in real.parents or real in root.parents, path
    assert [p.name for p in root.iterdir()] == ["fine"]
    print(f"\nlearner: {learner.stats['malformed']} events with unsafe user ids skipped")
