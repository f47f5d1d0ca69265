"""The real gRPC server over loopback: API behaviour, error statuses, health, reflection."""

from __future__ import annotations

import math
import socket
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from loraloop.client import LoraLoopClient, Reply
from loraloop.core.gen.loraloop.v1 import api_pb2, api_pb2_grpc, common_pb2, events_pb2
from loraloop.core.kafka.admin import ensure_loraloop_topics
from loraloop.core.settings import Settings
from tests.support import InProcessServer, isolated_settings, read_topic, wait_until

pytestmark = pytest.mark.kafka


@pytest.fixture(scope="module")
def served(
    kafka_bootstrap: str,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[Settings, InProcessServer]]:
    settings = isolated_settings(
        kafka_bootstrap, tmp_path_factory.mktemp("srv"), max_new_tokens=32, max_prompt_tokens=64
    )
    ensure_loraloop_topics(settings)
    server = InProcessServer(settings)
    yield settings, server
    server.stop()


@pytest.fixture
def client(served) -> Iterator[LoraLoopClient]:
    with LoraLoopClient(served[1].target, timeout=60, retries=1) as c:
        yield c


@pytest.fixture
def stub(served) -> Iterator[api_pb2_grpc.LoraLoopStub]:
    with grpc.insecure_channel(served[1].target) as channel:
        yield api_pb2_grpc.LoraLoopStub(channel)


def _code(fn, *args, **kwargs) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as info:
        fn(*args, **kwargs)
    return info.value.code(), info.value.details()


def test_generate_reports_ids_usage_and_logs_the_interaction(served, client) -> None:
    settings, _ = served
    reply = client.generate("carol", "What should I see in Tokyo?", max_tokens=12, seed=3)
    assert reply.adapter_version == 0 and reply.arm == "default"
    assert 0 < reply.completion_tokens <= 12 and reply.prompt_tokens > 0
    assert reply.finish_reason in {"stop", "length"}
    served[1].running.service.events.flush()
    events = [
        events_pb2.Interaction.FromString(r.value)
        for r in read_topic(settings.kafka_bootstrap, settings.topic_interactions)
    ]
    event = next(e for e in events if e.request_id == reply.request_id)
    assert event.user_id == "carol" and event.response_text == reply.text
    assert len(event.response_token_ids) == reply.completion_tokens
    assert len(event.behaviour_logprobs) == reply.completion_tokens
    assert all(lp <= 0 and math.isfinite(lp) for lp in event.behaviour_logprobs)


def test_same_seed_same_text_and_stream_matches_unary(client) -> None:
    a = client.generate("dave", "Tell me about travel", max_tokens=16, seed=7)
    b = client.generate("dave", "Tell me about travel", max_tokens=16, seed=7)
    assert a.text == b.text
    parts = list(client.stream("dave", "Tell me about travel", max_tokens=16, seed=7))
    final = parts[-1]
    assert isinstance(final, Reply)
    assert all(isinstance(p, str) for p in parts[:-1])
    assert "".join(parts[:-1]) == final.text == a.text


def test_chat_messages_are_accepted(client) -> None:
    reply = client.generate(
        "erin", messages=[("system", "Be brief."), ("user", "Hi!")], max_tokens=8, temperature=0
    )
    assert reply.completion_tokens > 0


def test_concurrent_users_are_batched_together(served, client) -> None:
    from concurrent.futures import ThreadPoolExecutor

    engine = served[1].running.service.engine
    before = engine.batches
    with ThreadPoolExecutor(8) as pool:
        replies = list(
            pool.map(
                lambda i: client.generate(f"u{i}", "How do I cook rice?", max_tokens=8, seed=i),
                range(8),
            )
        )
    assert len({r.request_id for r in replies}) == 8
    assert engine.batches - before < 8  # several users shared a forward pass


@pytest.mark.parametrize(
    ("request_kwargs", "code", "fragment"),
    [
        ({"user_id": "u", "prompt": ""}, grpc.StatusCode.INVALID_ARGUMENT, "prompt is empty"),
        ({"user_id": "u"}, grpc.StatusCode.INVALID_ARGUMENT, "set either prompt or messages"),
        ({"user_id": "", "prompt": "hi"}, grpc.StatusCode.INVALID_ARGUMENT, "user_id is empty"),
        ({"user_id": "../etc", "prompt": "hi"}, grpc.StatusCode.INVALID_ARGUMENT, "user_id"),
        ({"user_id": "u" * 129, "prompt": "hi"}, grpc.StatusCode.INVALID_ARGUMENT, "limit is 128"),
        (
            {"user_id": "u", "prompt": "hi", "sampling": {"max_tokens": -1}},
            grpc.StatusCode.INVALID_ARGUMENT,
            "max_tokens=-1",
        ),
        (
            {"user_id": "u", "prompt": "hi", "sampling": {"max_tokens": 10_000}},
            grpc.StatusCode.INVALID_ARGUMENT,
            "use 1..32",
        ),
        (
            {"user_id": "u", "prompt": "hi", "sampling": {"temperature": float("nan")}},
            grpc.StatusCode.INVALID_ARGUMENT,
            "temperature",
        ),
        (
            {"user_id": "u", "prompt": "hi", "sampling": {"top_p": 0.0}},
            grpc.StatusCode.INVALID_ARGUMENT,
            "top_p",
        ),
        (
            {"user_id": "u", "prompt": "word " * 200},
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            "limit is 64",
        ),
    ],
)
def test_bad_generate_requests_get_clear_statuses(
    stub, client, request_kwargs, code, fragment
) -> None:
    sampling = request_kwargs.pop("sampling", {})
    request = api_pb2.GenerateRequest(
        **request_kwargs, sampling=common_pb2.SamplingParams(**sampling)
    )
    assert _code(stub.Generate, request, timeout=30)[0] == code
    got, details = _code(lambda: list(stub.GenerateStream(request, timeout=30)))
    assert got == code and fragment in details
    # the server is unharmed
    assert client.generate("u", "hi", max_tokens=4).completion_tokens > 0


def test_bad_chat_role(stub) -> None:
    request = api_pb2.GenerateRequest(
        user_id="u",
        messages=api_pb2.ChatMessages(
            messages=[common_pb2.ChatMessage(role="wizard", content="hi")]
        ),
    )
    code, details = _code(stub.Generate, request, timeout=30)
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "role='wizard'" in details


def test_feedback_rules(client) -> None:
    reply = client.generate("frank", "How do I cook rice?", max_tokens=4)
    assert client.feedback(reply.request_id, "frank", thumbs=1)
    code, details = _code(client.feedback, reply.request_id, "mallory", thumbs=1)
    assert code == grpc.StatusCode.PERMISSION_DENIED and "issued to another user_id" in details
    code, details = _code(client.feedback, "made-up", "frank", thumbs=1)
    assert code == grpc.StatusCode.NOT_FOUND and "request_id" in details
    # a tampered id was not issued by this service: unknown, not "another user's"
    tampered = reply.request_id[:-1] + ("0" if reply.request_id[-1] != "0" else "1")
    assert _code(client.feedback, tampered, "frank", thumbs=1)[0] == grpc.StatusCode.NOT_FOUND
    code, details = _code(client.feedback, reply.request_id, "frank")
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "signals is empty" in details
    code, details = _code(client.feedback, reply.request_id, "frank", thumbs=3)
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "thumbs" in details


def test_user_state_and_delete(served, client) -> None:
    settings, server = served
    state = client.user_state("gina")
    assert (state.adapter_version, state.updates) == (0, 0)
    assert client.delete_user("gina") is False  # nothing of hers existed; recorded anyway
    server.running.service.events.flush()
    tombstones = [
        r
        for r in read_topic(settings.kafka_bootstrap, settings.topic_adapter_updates)
        if r.key == b"gina"
    ]
    assert tombstones and tombstones[-1].value is None
    assert _code(client.user_state, "bad id")[0] == grpc.StatusCode.INVALID_ARGUMENT


def test_health_and_reflection(served) -> None:
    with grpc.insecure_channel(served[1].target) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for service in ("", "loraloop.v1.LoraLoop"):
            status = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=10)
            assert status.status == health_pb2.HealthCheckResponse.SERVING
        reflect = reflection_pb2_grpc.ServerReflectionStub(channel)
        answer = next(
            reflect.ServerReflectionInfo(
                iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=10
            )
        )
        names = {s.name for s in answer.list_services_response.service}
        assert {"loraloop.v1.LoraLoop", "grpc.health.v1.Health"} <= names


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_server_without_kafka_keeps_serving_and_spills_events(tmp_path: Path) -> None:
    settings = isolated_settings(f"127.0.0.1:{_closed_port()}", tmp_path)
    server = InProcessServer(settings)
    try:
        with LoraLoopClient(server.target, timeout=60) as client:
            client.wait_ready()
            reply = client.generate("hank", "How do I cook rice?", max_tokens=4)
            assert client.feedback(reply.request_id, "hank", thumbs=1)
        events = server.running.service.events
        wait_until(lambda: events.journal.pending == 2, 10, "two events in the spill journal")
        assert events.backlog == 2 and events.spilled == 2
        assert events.sent == 0 and events.dropped == 0
    finally:
        server.stop()


def test_graceful_stop_turns_health_not_serving(kafka_bootstrap: str, tmp_path: Path) -> None:
    settings = isolated_settings(kafka_bootstrap, tmp_path)
    server = InProcessServer(settings)
    channel = grpc.insecure_channel(server.target)
    health = health_pb2_grpc.HealthStub(channel)
    assert health.Check(health_pb2.HealthCheckRequest(), timeout=10).status == (
        health_pb2.HealthCheckResponse.SERVING
    )
    server.call(server.running.health.set("", health_pb2.HealthCheckResponse.NOT_SERVING))
    assert health.Check(health_pb2.HealthCheckRequest(), timeout=10).status == (
        health_pb2.HealthCheckResponse.NOT_SERVING
    )
    channel.close()
    server.stop()
