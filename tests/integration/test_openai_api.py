"""The OpenAI-compatible HTTP API against the real server on loopback, with the official
`openai` client: sync, async and streamed chat completions, completions, models, the
feedback route closing the loop through a real learner process, errors and their
statuses, auth with the same scoped keys, HTTPS with the gRPC server's certificate, and
one request path: what HTTP serves is what gRPC serves, logged to Kafka the same way and
counted in the same metrics with protocol="http"."""

from __future__ import annotations

import asyncio
import inspect
import logging
import re
import socket
import ssl
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import hypothesis
import openai
import pytest
from grpc_health.v1 import health_pb2
from hypothesis import HealthCheck, given
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry

from loraloop.client import LoraLoopClient
from loraloop.core.gen.loraloop.v1 import api_pb2, api_pb2_grpc, common_pb2, events_pb2
from loraloop.core.kafka.admin import ensure_loraloop_topics
from loraloop.core.settings import Settings
from loraloop.service.call_metadata import read_response_metadata
from tests.support import InProcessServer, Process, isolated_settings, read_topic, wait_until

pytestmark = pytest.mark.kafka

ADMIN = "k-admin-0123456789abcdef"
ACME = "k-acme-0123456789abcdef0"
KEYS = f"{ADMIN}=*; {ACME}=acme.*"
CHAT = [{"role": "user", "content": "How do I cook rice?"}]
READY: Any = {"params": {"service": "loraloop.v1.LoraLoop"}}  # the readiness probe's query


@pytest.fixture(scope="module")
def served(
    kafka_bootstrap: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[Settings, InProcessServer]]:
    settings = isolated_settings(
        kafka_bootstrap,
        tmp_path_factory.mktemp("openai"),
        http_port=0,
        api_keys=KEYS,
        max_new_tokens=32,
        max_prompt_tokens=64,
    )
    ensure_loraloop_topics(settings)
    server = InProcessServer(settings)
    yield settings, server
    server.stop()


def _client(server: InProcessServer, key: str = ADMIN, **kwargs: Any) -> openai.OpenAI:
    assert server.running.http is not None
    return openai.OpenAI(
        base_url=f"{server.running.http.url}/v1", api_key=key, max_retries=0, **kwargs
    )


@pytest.fixture(scope="module")
def client(served) -> Iterator[openai.OpenAI]:
    with _client(served[1]) as c:
        yield c


@pytest.fixture(scope="module")
def model(client: openai.OpenAI) -> str:
    return client.models.list().data[0].id


def _interaction(settings: Settings, request_id: str) -> events_pb2.Interaction:
    for record in read_topic(settings.kafka_bootstrap, settings.topic_interactions):
        event = events_pb2.Interaction.FromString(record.value)
        if event.request_id == request_id:
            return event
    raise AssertionError(f"no Interaction for {request_id}")


def test_models_lists_the_base_model(served, client, model) -> None:
    settings, server = served
    models = client.models.list().data
    assert [m.id for m in models] == [server.running.service.engine.model_id] == [model]
    assert model == settings.model  # LORALOOP_MODEL_ID unset: the model path


def test_chat_completion_is_the_grpc_answer_logged_the_same_way(served, client, model) -> None:
    settings, server = served
    raw = client.chat.completions.with_raw_response.create(
        model=model, messages=CHAT, user="carol", max_tokens=12, temperature=0
    )
    reply = raw.parse()
    text = reply.choices[0].message.content
    assert reply.object == "chat.completion" and reply.model == model and text
    assert reply.choices[0].finish_reason in {"stop", "length"}
    assert reply.adapter_version == 0 and reply.arm == "default"  # type: ignore[attr-defined]
    assert 0 < reply.usage.completion_tokens <= 12 and reply.usage.prompt_tokens > 0
    assert raw.headers["x-loraloop-request-id"] == reply.id
    assert raw.headers["x-loraloop-adapter-version"] == "0"
    assert raw.headers["x-loraloop-arm"] == "default"

    # the same request over gRPC: the same engine answers the same
    with LoraLoopClient(server.target, timeout=60, api_key=ADMIN) as grpc_client:
        same = grpc_client.generate(
            "carol", messages=[("user", CHAT[0]["content"])], max_tokens=12, temperature=0
        )
    assert same.text == text and same.completion_tokens == reply.usage.completion_tokens

    server.running.service.events.flush()
    event = _interaction(settings, reply.id)
    assert event.user_id == "carol" and event.response_text == text
    assert len(event.response_token_ids) == reply.usage.completion_tokens
    assert event.prompt.startswith("user: How do I cook rice?")


def test_async_chat_completions_run_concurrently(served, model) -> None:
    server = served[1]
    engine = server.running.service.engine

    async def ask() -> list[Any]:
        async with openai.AsyncOpenAI(
            base_url=f"{server.running.http.url}/v1", api_key=ADMIN, max_retries=0
        ) as client:
            return await asyncio.gather(
                *(
                    client.chat.completions.create(
                        model=model,
                        messages=CHAT,
                        safety_identifier=f"async{i}",
                        max_completion_tokens=8,
                        seed=i,
                    )
                    for i in range(6)
                )
            )

    before = engine.batches
    replies = asyncio.run(ask())
    assert len({r.id for r in replies}) == 6
    assert all(r.usage.completion_tokens > 0 for r in replies)
    assert engine.batches - before < 6  # they joined one running batch, mixed users


def test_streamed_chat_is_the_unary_answer_in_chunks(served, client, model) -> None:
    kwargs: dict[str, Any] = {"model": model, "messages": CHAT, "max_tokens": 16, "seed": 7}
    unary = client.chat.completions.create(user="dave", **kwargs)
    with client.chat.completions.with_streaming_response.create(
        user="dave", stream=True, stream_options={"include_usage": True}, **kwargs
    ) as response:
        headers = response.headers
        chunks = list(response.parse())
    assert headers["content-type"].startswith("text/event-stream")
    ids = {c.id for c in chunks}
    assert len(ids) == 1 and headers["x-loraloop-request-id"] in ids
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == unary.choices[0].message.content
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finishes[-1] == unary.choices[0].finish_reason and not any(finishes[:-1])
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == (
        unary.usage.completion_tokens
    )
    assert all(c.adapter_version == 0 and c.arm == "default" for c in chunks)  # type: ignore[attr-defined]


def test_grpc_stream_sends_the_ids_as_initial_metadata(served) -> None:
    """What the HTTP stream's headers and chunk ids come from, there for gRPC clients too."""
    server = served[1]
    request = api_pb2.GenerateRequest(
        user_id="dora",
        prompt="Tell me about travel",
        sampling=common_pb2.SamplingParams(max_tokens=4),
    )
    with grpc.insecure_channel(server.target) as channel:
        call = api_pb2_grpc.LoraLoopStub(channel).GenerateStream(
            request, timeout=60, metadata=(("x-api-key", ADMIN),)
        )
        ids = read_response_metadata(call.initial_metadata())
        final = list(call)[-1].final
    assert ids == (final.request_id, final.adapter_version, final.arm)


def test_completions_unary_and_streamed(client, model) -> None:
    kwargs: dict[str, Any] = {"model": model, "prompt": "Tell me about travel", "seed": 3}
    reply = client.completions.create(user="erin", max_tokens=10, **kwargs)
    assert reply.object == "text_completion" and reply.choices[0].text
    assert reply.usage.completion_tokens <= 10
    parts = list(client.completions.create(user="erin", max_tokens=10, stream=True, **kwargs))
    assert "".join(p.choices[0].text for p in parts) == reply.choices[0].text
    assert parts[-1].choices[0].finish_reason == reply.choices[0].finish_reason


def _status(fn: Any, *args: Any, **kwargs: Any) -> openai.APIStatusError:
    with pytest.raises(openai.APIStatusError) as info:
        fn(*args, **kwargs)
    return info.value


def _error(err: openai.APIStatusError) -> dict[str, Any]:
    assert isinstance(err.body, dict) and set(err.body) == {"message", "type", "param", "code"}
    return err.body


@pytest.mark.parametrize(
    ("extra", "status", "param", "fragment"),
    [
        ({"n": 2}, 400, "n", "one choice per request"),
        ({"stop": ["\n"]}, 400, "stop", "stop sequences are not supported"),
        ({"temperature": "hot"}, 400, "temperature", "valid number"),
        ({"extra_body": {"best_of_n": 3}}, 400, "best_of_n", "Unrecognized request argument"),
        ({"max_tokens": 10_000}, 400, "max_tokens", "use 1..32"),
        ({"top_p": 0.0}, 400, "top_p", "top_p=0.0 is out of range"),
        ({"user": "../etc"}, 400, "user", "user may only hold"),
        ({"messages": [{"role": "wizard", "content": "hi"}]}, 400, "messages[0].role", "wizard"),
        ({"messages": [{"role": "user", "content": "word " * 300}]}, 429, "messages", "limit"),
        ({"model": "gpt-5"}, 404, "model", "does not exist"),
    ],
)
def test_bad_requests_get_openai_errors_naming_the_field(
    client, model, extra, status, param, fragment
) -> None:
    kwargs: dict[str, Any] = {"model": model, "messages": CHAT, "user": "frank", **extra}
    err = _status(client.chat.completions.create, **kwargs)
    body = _error(err)
    assert (err.status_code, body["param"]) == (status, param) and fragment in body["message"]
    if status == 429:  # too long a prompt: a retry cannot help, and the client is told so
        assert err.response.headers["x-should-retry"] == "false"
        assert body["code"] == "context_length_exceeded"


def test_the_user_id_comes_from_the_body_or_a_header(served, client, model) -> None:
    body = _error(_status(client.chat.completions.create, model=model, messages=CHAT))
    assert body["param"] == "user" and body["code"] == "missing_required_parameter"
    assert (
        "'user' or 'safety_identifier'" in body["message"] and "x-loraloop-user" in body["message"]
    )
    reply = client.chat.completions.create(
        model=model, messages=CHAT, max_tokens=2, extra_headers={"x-loraloop-user": "gina"}
    )
    assert served[1].running.service.request_ids.belongs_to(reply.id, "gina")
    err = _status(
        client.chat.completions.create,
        model=model,
        messages=CHAT,
        user="gina",
        safety_identifier="hank",
    )
    assert err.status_code == 400 and "different users" in _error(err)["message"]


def test_keys_are_the_grpc_keys_with_their_scopes(served, model) -> None:
    server = served[1]
    with _client(server, key="not-a-key-0123456789") as stranger:
        err = _status(stranger.models.list)
        assert err.status_code == 401 and "not valid" in _error(err)["message"]
    with _client(server) as nobody:
        no_key = {"Authorization": openai.omit}  # the SDK then sends no Authorization at all
        err = _status(
            nobody.chat.completions.create,
            model=model,
            messages=CHAT,
            user="ivy",
            extra_headers=no_key,
        )
        assert err.status_code == 401 and "Authorization: Bearer" in _error(err)["message"]
    with _client(server, key=ACME) as acme:
        ok = acme.chat.completions.create(model=model, messages=CHAT, user="acme.ivy", max_tokens=2)
        assert ok.usage.completion_tokens > 0
        err = _status(acme.chat.completions.create, model=model, messages=CHAT, user="bob")
        assert err.status_code == 403 and "scoped to acme.*" in _error(err)["message"]
        err = _status(
            acme.post,
            "/feedback",
            cast_to=object,
            body={"request_id": ok.id, "user": "bob", "signals": {"thumbs": 1}},
        )
        assert err.status_code == 403


def test_feedback_route_keeps_the_grpc_rules(served, client, model) -> None:
    settings, server = served
    reply = client.chat.completions.create(model=model, messages=CHAT, user="jack", max_tokens=4)

    def feedback(body: dict[str, Any]) -> Any:
        return client.post("/feedback", cast_to=object, body=body)

    answer = feedback({"request_id": reply.id, "user": "jack", "signals": {"thumbs": 1}})
    assert answer["accepted"] is True
    # another user's response (the request id's HMAC binds it to jack), a made-up id: the
    # servicer's own refusals, word for word as over gRPC
    with LoraLoopClient(server.target, timeout=60, retries=1, api_key=ADMIN) as grpc_client:
        cases = (("mallory", reply.id, 403, "PERMISSION_DENIED"), ("jack", "x", 404, "NOT_FOUND"))
        for user, request_id, status, code in cases:
            body = {"request_id": request_id, "user": user, "signals": {"thumbs": 1}}
            err = _status(feedback, body)
            with pytest.raises(grpc.RpcError) as over_grpc:
                grpc_client.feedback(request_id, user, thumbs=1)
            assert (err.status_code, over_grpc.value.code().name) == (status, code)
            assert _error(err)["message"] == over_grpc.value.details()
            assert _error(err)["param"] == "request_id"
    err = _status(feedback, {"request_id": reply.id, "user": "jack", "signals": {"thumbs": 3}})
    assert (err.status_code, _error(err)["param"]) == (400, "signals.thumbs")
    err = _status(feedback, {"request_id": reply.id, "user": "jack", "signals": {"likes": 1}})
    assert (err.status_code, _error(err)["param"]) == (400, "signals.likes")
    err = _status(feedback, {"request_id": reply.id, "user": "jack", "signals": {}})
    assert err.status_code == 400 and "signals is empty" in _error(err)["message"]

    server.running.service.events.flush()
    events = [
        events_pb2.FeedbackEvent.FromString(r.value)
        for r in read_topic(settings.kafka_bootstrap, settings.topic_feedback)
    ]
    mine = [e for e in events if e.request_id == reply.id]
    assert [(e.user_id, e.signals.thumbs) for e in mine] == [("jack", 1)]


def test_calls_are_counted_and_logged_by_protocol(served, client, model, caplog) -> None:
    server = served[1]
    registry: CollectorRegistry = server.running.metrics.registry

    def count(protocol: str, method: str, code: str = "OK") -> float:
        labels = {"protocol": protocol, "service": "loraloop.v1.LoraLoop", "method": method}
        return (
            registry.get_sample_value("loraloop_server_requests_total", labels | {"code": code})
            or 0
        )

    before = (count("http", "Generate"), count("grpc", "Generate"), count("http", "GenerateStream"))
    refused = count("http", "Generate", "NOT_FOUND")
    _status(client.chat.completions.create, model="gpt-5", messages=CHAT, user="kim")
    assert count("http", "Generate", "NOT_FOUND") == refused + 1
    with caplog.at_level(logging.INFO, logger="loraloop.access"):
        reply = client.chat.completions.create(model=model, messages=CHAT, user="kim", max_tokens=2)
        list(
            client.chat.completions.create(
                model=model, messages=CHAT, user="kim", max_tokens=2, stream=True
            )
        )
        with LoraLoopClient(server.target, timeout=60, api_key=ADMIN) as grpc_client:
            grpc_client.generate("kim", "hi", max_tokens=2)
    after = (count("http", "Generate"), count("grpc", "Generate"), count("http", "GenerateStream"))
    assert [b - a for a, b in zip(before, after, strict=True)] == [1, 1, 1]
    lines = [r for r in caplog.records if r.name == "loraloop.access"]
    http = [r for r in lines if getattr(r, "protocol", "") == "http" and r.rpc == "Generate"]
    assert any(getattr(r, "request_id", "") == reply.id and r.status == 200 for r in http)
    assert any(getattr(r, "protocol", "") == "grpc" for r in lines)
    labels = {"protocol": "http", "service": "loraloop.v1.LoraLoop", "method": "GenerateStream"}
    wait_until(  # the stream's call ends just after the client read [DONE]
        lambda: registry.get_sample_value("loraloop_server_requests_in_flight", labels) == 0,
        10,
        "the streamed call to end",
    )
    assert server.running.service.limit.in_flight == 0


def _set_health(server: InProcessServer, status: int) -> None:
    """The LoraLoop service's gRPC health status (grpc_health's sync or asyncio servicer)."""
    done = server.running.health.set("loraloop.v1.LoraLoop", status)
    if inspect.isawaitable(done):
        asyncio.run_coroutine_threadsafe(_wait(done), server.loop).result(10)


async def _wait(awaitable: Any) -> None:
    await awaitable


def test_health_route_answers_what_grpc_health_says(served) -> None:
    server = served[1]
    with _client(server) as c:  # /health is outside /v1 and needs no key
        health = c.with_options(base_url=server.running.http.url, api_key="x")
        assert health.get("/health", cast_to=object) == {"status": "SERVING"}
        assert health.get("/health", cast_to=object, options=READY) == {"status": "SERVING"}
        _set_health(server, health_pb2.HealthCheckResponse.NOT_SERVING)
        try:
            err = _status(health.get, "/health", cast_to=object, options=READY)
            assert err.status_code == 503
        finally:
            _set_health(server, health_pb2.HealthCheckResponse.SERVING)
        assert _status(health.get, "/nowhere", cast_to=object).status_code == 404


_JSON = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3)
    ),
    max_leaves=8,
)
_FIELDS = [
    "model",
    "messages",
    "prompt",
    "user",
    "safety_identifier",
    "max_tokens",
    "max_completion_tokens",
    "temperature",
    "top_p",
    "seed",
    "n",
    "stop",
    "stream",
    "stream_options",
    "logprobs",
    "request_id",
    "signals",
    "zzz",
]
_MESSAGE = st.fixed_dictionaries(
    {"role": st.sampled_from(["user", "system", "developer", "tool", "x"]), "content": _JSON}
)


@hypothesis.settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
@given(
    route=st.sampled_from(["/chat/completions", "/completions", "/feedback"]),
    body=st.dictionaries(
        st.sampled_from(_FIELDS), _JSON | st.lists(_MESSAGE, max_size=2), max_size=8
    ),
    fill=st.booleans(),
)
def test_fuzzed_bodies_never_get_a_server_error(served, model, route, body, fill) -> None:
    """Any JSON body is answered 2xx or 4xx in OpenAI's shape, never 5xx."""
    if fill:  # often enough a body that gets past the first checks
        body = {"model": model, "user": "fuzz", "max_tokens": 2, **body}
    with _client(served[1]) as c:
        try:
            c.post(
                route,
                cast_to=object,
                body=body,
                stream=bool(body.get("stream")),
                stream_cls=openai.Stream[object],
            )
        except openai.APIStatusError as err:
            assert 400 <= err.status_code < 500, (err.status_code, err.body)
            _error(err)
        except openai.APIError as err:  # an error event inside a stream
            raise AssertionError(f"{route} {body}: {err}") from None


def test_feedback_over_http_closes_the_loop_with_a_real_learner(
    kafka_bootstrap: str, tmp_path: Path
) -> None:
    """`loraloop serve` and `loraloop learn` as processes: feedback sent over HTTP makes a
    new adapter version, which the next HTTP answer for that user reports; SIGTERM stops
    both front doors (exit code 0)."""
    settings = isolated_settings(kafka_bootstrap, tmp_path, http_port=0, learning_rate=0.02)
    ensure_loraloop_topics(settings)
    server = Process(["serve"], settings, ready=r"listening on [\d.]+:(\d+)")
    learner = None
    try:
        found = [m for line in server.lines if (m := re.search(r"http api on (http://\S+)", line))]
        assert found, server.output
        learner = Process(["learn"], settings, ready=r"learner consuming")
        with openai.OpenAI(base_url=f"{found[0].group(1)}/v1", api_key="none", max_retries=0) as c:
            model = c.models.list().data[0].id
            first = c.chat.completions.create(
                model=model, messages=CHAT, user="lena", max_tokens=12, seed=1
            )
            assert first.adapter_version == 0  # type: ignore[attr-defined]
            answer = c.post(
                "/feedback",
                cast_to=object,
                body={"request_id": first.id, "user": "lena", "signals": {"thumbs": 1}},
            )
            assert answer["accepted"] is True

            def version() -> int:
                reply = c.chat.completions.create(
                    model=model, messages=CHAT, user="lena", max_tokens=1
                )
                return int(reply.adapter_version)  # type: ignore[attr-defined]

            wait_until(lambda: version() >= 1, 90, "lena's adapter v1 served over HTTP")
            other = c.chat.completions.create(model=model, messages=CHAT, user="max", max_tokens=1)
            assert other.adapter_version == 0  # type: ignore[attr-defined]
    finally:
        for proc in (learner, server):
            if proc is not None:
                assert proc.stop() == 0, proc.output


def test_https_with_the_grpc_servers_certificate(tmp_path: Path) -> None:
    from tests.faults.test_tls import make_ca, make_leaf

    ca = make_ca(tmp_path, "loraloop-test-ca")
    cert = make_leaf(tmp_path, "server", ca, server=True)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed = s.getsockname()[1]
    settings = isolated_settings(
        f"127.0.0.1:{closed}",
        tmp_path,
        http_port=0,
        tls_cert_file=cert.cert,
        tls_key_file=cert.key,
        max_new_tokens=8,
    )
    server = InProcessServer(settings)
    try:
        assert server.running.http is not None
        url = server.running.http.url
        assert url.startswith("https://")
        trusted = openai.DefaultHttpxClient(verify=ssl.create_default_context(cafile=ca[0].cert))
        with openai.OpenAI(
            base_url=f"{url}/v1", api_key="x", max_retries=0, http_client=trusted
        ) as c:
            reply = c.completions.create(
                model=settings.model, prompt="Hello", user="nia", max_tokens=2
            )
            assert reply.usage.completion_tokens > 0
        plain = url.replace("https://", "http://")
        for base, why in ((url, "a CA the client does not trust"), (plain, "plaintext")):
            c = openai.OpenAI(base_url=f"{base}/v1", api_key="x", max_retries=0)
            with c, pytest.raises(openai.APIConnectionError):
                c.models.list()
                pytest.fail(f"served over {why}")
    finally:
        server.stop()
