"""API keys over real gRPC: missing or unknown key → UNAUTHENTICATED, a key used for a user
outside its scope → PERMISSION_DENIED, messages that say what to fix and never hold a key;
health and reflection stay open; the client sends LORALOOP_API_KEY."""

from __future__ import annotations

import asyncio
import hashlib
import logging
import secrets
import socket
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from loadtests.config import LoadConfig
from loadtests.generator import run_load
from loraloop.client import LoraLoopClient
from loraloop.core.gen.loraloop.v1 import api_pb2, api_pb2_grpc
from loraloop.service.auth import ApiKeyConfigError, ApiKeys, RefusalLog, parse_api_keys
from loraloop.service.server import create_server
from tests.support import InProcessServer, isolated_settings

ADMIN = "adm-" + secrets.token_urlsafe(24)
ACME = "acme-" + secrets.token_urlsafe(24)
BOB = "bob-" + secrets.token_urlsafe(24)
HASHED = "carol-" + secrets.token_urlsafe(24)  # configured by its SHA-256 only
WRONG = "nope-" + secrets.token_urlsafe(24)
KEYS = ";\n".join(
    [
        f"{ADMIN}=*",
        f"{ACME}=acme.*",
        f"{BOB}=bob, bob-test",
        f"sha256:{hashlib.sha256(HASHED.encode()).hexdigest()}=carol",
    ]
)
ALL_KEYS = (ADMIN, ACME, BOB, HASHED, WRONG)


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[InProcessServer]:
    # No broker: auth does not need Kafka (events queue up meanwhile), and it keeps this fast.
    settings = isolated_settings(
        f"127.0.0.1:{_closed_port()}",
        tmp_path_factory.mktemp("auth"),
        api_keys=KEYS,
        auth_required=True,
        max_new_tokens=8,
    )
    served = InProcessServer(settings)
    yield served
    served.stop()


@pytest.fixture
def stub(server: InProcessServer) -> Iterator[api_pb2_grpc.LoraLoopStub]:
    with grpc.insecure_channel(server.target) as channel:
        yield api_pb2_grpc.LoraLoopStub(channel)


def _gen(user: str) -> api_pb2.GenerateRequest:
    request = api_pb2.GenerateRequest(user_id=user, prompt="How do I cook rice?")
    request.sampling.max_tokens = 4
    return request


def _refused(fn, *args, **kwargs) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as info:
        result = fn(*args, **kwargs)
        if hasattr(result, "__iter__") and not isinstance(result, api_pb2.GenerateResponse):
            list(result)
    details = info.value.details() or ""
    for key in ALL_KEYS:
        assert key not in details, "a key was echoed back"
    return info.value.code(), details


def test_config_format_and_its_errors() -> None:
    entries = parse_api_keys(KEYS)
    assert len(entries) == 4
    keys = ApiKeys(entries)
    admin, acme, bob, carol = (keys.lookup(k) for k in (ADMIN, ACME, BOB, HASHED))
    assert keys.lookup(WRONG) is None and keys.lookup("") is None
    assert admin is not None and admin.scope.allows("anyone")
    assert acme is not None and acme.scope.allows("acme.alice") and not acme.scope.allows("bob")
    assert bob is not None and bob.scope.allows("bob-test") and not bob.scope.allows("bobby")
    assert carol is not None and carol.scope.allows("carol") and not carol.scope.allows("acme.x")
    assert parse_api_keys("") == [] and parse_api_keys(" ; \n ") == []
    # a base64 key may end in '=': the last '=' separates the scopes
    padded = "c2VjcmV0LXNlY3JldC1zZWNyZXQ="
    assert ApiKeys.parse(f"{padded}=alice").lookup(padded) is not None
    bad = {
        "short-key=*": "at least 16",
        f"{ADMIN}": "KEY=SCOPES",
        f"{ADMIN}=": "no scopes",
        f"{ADMIN}=../x": "not a user id",
        f"{ADMIN}=a*b*": "prefix",
        f"{ADMIN}=*;{ADMIN}=bob": "listed twice",
        f"{ADMIN} x=*": "whitespace",
    }
    for text, fragment in bad.items():
        with pytest.raises(ApiKeyConfigError) as info:
            parse_api_keys(text)
        message = str(info.value)
        assert fragment in message and "entry" in message
        assert ADMIN not in message and "short-key" not in message


def test_auth_required_without_keys_refuses_to_start(tmp_path: Path) -> None:
    settings = isolated_settings(f"127.0.0.1:{_closed_port()}", tmp_path, auth_required=True)
    with pytest.raises(ApiKeyConfigError, match="LORALOOP_API_KEYS is empty"):
        asyncio.run(create_server(settings))  # fails before any model is loaded


def test_missing_and_unknown_keys_are_unauthenticated(stub) -> None:
    code, details = _refused(stub.Generate, _gen("acme.alice"), timeout=30)
    assert code == grpc.StatusCode.UNAUTHENTICATED and "x-api-key" in details
    for metadata in ((("x-api-key", WRONG),), (("authorization", f"Bearer {WRONG}"),)):
        code, details = _refused(stub.Generate, _gen("acme.alice"), timeout=30, metadata=metadata)
        assert code == grpc.StatusCode.UNAUTHENTICATED and "not valid" in details
    code, _ = _refused(stub.GenerateStream, _gen("acme.alice"), timeout=30)
    assert code == grpc.StatusCode.UNAUTHENTICATED
    for call, request in (
        (stub.GetUserState, api_pb2.GetUserStateRequest(user_id="bob")),
        (stub.DeleteUser, api_pb2.DeleteUserRequest(user_id="bob")),
        (stub.Feedback, api_pb2.FeedbackRequest(user_id="bob", request_id="x")),
    ):
        assert _refused(call, request, timeout=30)[0] == grpc.StatusCode.UNAUTHENTICATED


def test_keys_act_only_for_their_users(server, stub) -> None:
    ok = stub.Generate(_gen("acme.alice"), timeout=60, metadata=(("x-api-key", ACME),))
    assert ok.usage.completion_tokens > 0
    bearer = (("authorization", f"Bearer {BOB}"),)
    assert stub.Generate(_gen("bob-test"), timeout=60, metadata=bearer).request_id
    assert stub.Generate(_gen("carol"), timeout=60, metadata=(("x-api-key", HASHED),)).request_id
    assert stub.Generate(_gen("zed"), timeout=60, metadata=(("x-api-key", ADMIN),)).request_id

    code, details = _refused(
        stub.Generate, _gen("bob"), timeout=30, metadata=(("x-api-key", ACME),)
    )
    assert code == grpc.StatusCode.PERMISSION_DENIED
    assert "'bob'" in details and "acme.*" in details and "use a key for this user" in details
    code, _ = _refused(
        stub.GenerateStream, _gen("acme.alice"), timeout=30, metadata=(("x-api-key", BOB),)
    )
    assert code == grpc.StatusCode.PERMISSION_DENIED
    # Feedback, state and deletion of another tenant's user are refused before any lookup.
    feedback = api_pb2.FeedbackRequest(user_id="bob", request_id=ok.request_id)
    feedback.signals.thumbs = 1
    assert _refused(stub.Feedback, feedback, timeout=30, metadata=(("x-api-key", ACME),))[0] == (
        grpc.StatusCode.PERMISSION_DENIED
    )
    for call, request in (
        (stub.GetUserState, api_pb2.GetUserStateRequest(user_id="acme.alice")),
        (stub.DeleteUser, api_pb2.DeleteUserRequest(user_id="acme.alice")),
    ):
        code, _ = _refused(call, request, timeout=30, metadata=(("x-api-key", BOB),))
        assert code == grpc.StatusCode.PERMISSION_DENIED
    # a key's own user: allowed; bad input still gets its own status
    state = stub.GetUserState(
        api_pb2.GetUserStateRequest(user_id="acme.alice"), metadata=(("x-api-key", ACME),)
    )
    assert state.user_id == "acme.alice"
    code, details = _refused(
        stub.Generate, _gen("../etc"), timeout=30, metadata=(("x-api-key", ADMIN),)
    )
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "user_id" in details

    registry = server.running.metrics.registry
    refused = {
        code: registry.get_sample_value(
            "loraloop_server_requests_total",
            {"protocol": "grpc", "service": "loraloop.v1.LoraLoop", "method": "Generate"}
            | {"code": code},
        )
        for code in ("UNAUTHENTICATED", "PERMISSION_DENIED", "OK")
    }
    print(f"\nGenerate calls by status (refused ones are counted too): {refused}")
    assert (refused["PERMISSION_DENIED"] or 0) >= 1 and (refused["OK"] or 0) >= 4


def test_health_and_reflection_need_no_key(server) -> None:
    with grpc.insecure_channel(server.target) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        status = health.Check(health_pb2.HealthCheckRequest(service=""), timeout=10).status
        assert status == health_pb2.HealthCheckResponse.SERVING
        reflect = reflection_pb2_grpc.ServerReflectionStub(channel)
        answer = next(
            reflect.ServerReflectionInfo(
                iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=10
            )
        )
        assert "loraloop.v1.LoraLoop" in {s.name for s in answer.list_services_response.service}


def test_client_sends_the_key_from_the_environment(server, monkeypatch) -> None:
    monkeypatch.setenv("LORALOOP_API_KEY", ACME)
    with LoraLoopClient(server.target, timeout=60, retries=1) as client:
        client.wait_ready()
        reply = client.generate("acme.dora", "Hello there", max_tokens=4)
        assert client.feedback(reply.request_id, "acme.dora", thumbs=1)
        assert client.user_state("acme.dora").user_id == "acme.dora"
        code, _ = _refused(client.generate, "bob", "Hello", max_tokens=4)
        assert code == grpc.StatusCode.PERMISSION_DENIED
    monkeypatch.delenv("LORALOOP_API_KEY")
    with LoraLoopClient(server.target, timeout=60, retries=1, api_key=BOB) as client:
        assert client.generate("bob", "Hello", max_tokens=4).request_id  # explicit argument


def test_lookup_finds_each_key_among_many_and_nothing_else() -> None:
    """Every one of 300 keys finds its own entry (first, middle, last alike); near misses
    (one character changed, a prefix, the key plus a character, its digest) find nothing.
    The cost per lookup is measured by benchmarks/bench_auth.py."""
    keys_text = [f"k{i:04d}-{secrets.token_urlsafe(16)}" for i in range(300)]
    keys = ApiKeys.parse(";".join(f"{k}=user{i}" for i, k in enumerate(keys_text)))
    assert len(keys) == 300
    for i, key in enumerate(keys_text):
        entry = keys.lookup(key)
        assert entry is not None and entry.scope.allows(f"user{i}"), i
        assert not entry.scope.allows(f"user{(i + 1) % 300}")
    key = keys_text[150]
    flipped = key[:-1] + ("A" if key[-1] != "A" else "B")
    digest = "sha256:" + hashlib.sha256(key.encode()).hexdigest()
    for near in (flipped, key[:-1], key + "x", digest, key.upper(), ""):
        assert keys.lookup(near) is None, near


def test_a_reversed_entry_never_puts_the_key_in_the_error() -> None:
    """NAME=KEY instead of KEY=NAME: the key lands where the scopes go; the start-up error
    must say what is wrong without quoting it."""
    names = ("production-client", "a-service-name-long-enough")
    for key in (ADMIN, "k/" + secrets.token_hex(12), "x" * 10 + "*" + "y" * 10 + "*"):
        for name in names:
            for text in (f"{name}={key}", f"{ADMIN}=*;\n{name}=bob,{key}"):
                try:
                    parse_api_keys(text)
                except ApiKeyConfigError as err:
                    message = str(err)
                else:
                    # a key that happens to be a valid user id parses: no error to leak into
                    assert all(c.isalnum() or c in "._@-" for c in key)
                    continue
                assert key not in message and key[:12] not in message, message
                assert "KEY=SCOPES" in message and "entry" in message


def test_refusal_log_keeps_one_line_per_reason_and_interval(caplog) -> None:
    refusals = RefusalLog(interval_s=3600)
    with caplog.at_level(logging.INFO, logger="loraloop.service.auth"):
        for _ in range(100):
            refusals.refused_call("Generate", "unknown API key")
        refusals.refused_call("Generate", "key#12345678 may not act for this user_id")
        refusals.refused_call("Feedback", "unknown API key")
    lines = [r.getMessage() for r in caplog.records]
    assert (refusals.refused, refusals.logged) == (102, 3) and len(lines) == 3
    refusals.interval_s = 0  # the interval over: the next line says what was left out
    with caplog.at_level(logging.INFO, logger="loraloop.service.auth"):
        refusals.refused_call("Generate", "unknown API key")
    assert "99 more like it" in caplog.records[-1].getMessage()


def test_refused_calls_are_logged_at_a_bounded_rate(server, stub, caplog) -> None:
    """A client trying keys: 40 refused calls, at most a line or two in the log (one per
    RPC and reason every 10 s), never the guessed keys; every call is still refused."""
    auth = server.running.auth
    assert auth is not None
    refused, logged = auth.refusals.refused, auth.refusals.logged
    with caplog.at_level(logging.INFO, logger="loraloop.service.auth"):
        for i in range(40):
            metadata = (("x-api-key", f"guess-{i:04d}-{secrets.token_urlsafe(12)}"),)
            request = api_pb2.GetUserStateRequest(user_id="bob")
            code, _ = _refused(stub.GetUserState, request, timeout=30, metadata=metadata)
            assert code == grpc.StatusCode.UNAUTHENTICATED
    lines = [r.getMessage() for r in caplog.records if "refused" in r.getMessage()]
    print(f"\n40 calls with unknown keys: {len(lines)} log line(s): {lines}")
    assert auth.refusals.refused - refused == 40
    assert auth.refusals.logged - logged == len(lines) <= 2
    assert not any("guess-" in line for line in lines)


def test_load_generator_sends_the_key_from_the_environment(server, monkeypatch) -> None:
    def load() -> dict[str, int]:
        config = LoadConfig(
            target=server.target,
            concurrency=2,
            users=2,
            user_prefix="acme.load",
            duration=None,
            requests=4,
            max_tokens=4,
            stream_share=0.5,
        )
        codes: dict[str, int] = {}
        for call in run_load(config).calls:
            codes[f"{call.kind}:{call.code}"] = codes.get(f"{call.kind}:{call.code}", 0) + 1
        return codes

    monkeypatch.delenv("LORALOOP_API_KEY", raising=False)
    without = load()
    monkeypatch.setenv("LORALOOP_API_KEY", ACME)
    with_key = load()
    print(f"\nload run without a key: {without}; with LORALOOP_API_KEY: {with_key}")
    assert all(code.endswith(":UNAUTHENTICATED") for code in without)
    assert all(code.endswith(":OK") for code in with_key)
    assert any(code.startswith("feedback:") for code in with_key)
