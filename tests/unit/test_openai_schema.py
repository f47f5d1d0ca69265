"""The OpenAI wire format of the HTTP API: bodies mapped onto the servicer's proto requests,
refusals in OpenAI's error shape, the gRPC -> HTTP status mapping."""

from __future__ import annotations

from typing import Any

import grpc
import pytest

from loraloop.service import openai_schema as oa
from loraloop.service.call_metadata import read_response_metadata, response_metadata

CHAT = [{"role": "user", "content": "hi"}]


def _refused(fn: Any, *args: Any) -> oa.ApiError:
    with pytest.raises(oa.ApiError) as info:
        fn(*args)
    return info.value


def test_chat_body_becomes_the_grpc_request() -> None:
    parsed = oa.parse_chat(
        {
            "model": "m",
            "messages": [
                {"role": "developer", "content": "Be brief."},
                {
                    "role": "user",
                    "content": [{"type": "text", "text": t} for t in ("Hi ", "there")],
                },
            ],
            "safety_identifier": "alice",
            "max_completion_tokens": 9,
            "temperature": 0,
            "seed": 4,
            "n": 1,
            "presence_penalty": 0,
            "stream": True,
            "stream_options": {"include_usage": True},
        },
        None,
    )
    request = parsed.request
    assert request.user_id == "alice" and parsed.model == "m"
    assert [(m.role, m.content) for m in request.messages.messages] == [
        ("system", "Be brief."),
        ("user", "Hi there"),
    ]
    assert request.sampling.max_tokens == 9 and request.sampling.seed == 4
    assert request.sampling.HasField("temperature") and request.sampling.temperature == 0
    assert not request.sampling.HasField("top_p")  # unset: the arm's or the server's default
    assert parsed.stream and parsed.include_usage
    assert parsed.names["sampling.max_tokens"] == "max_completion_tokens"


def test_completion_body_and_the_user_header() -> None:
    parsed = oa.parse_completion({"model": "m", "prompt": ["Once"]}, "bob")
    assert parsed.request.prompt == "Once" and parsed.request.user_id == "bob"
    assert parsed.request.sampling.max_tokens == 0  # the server's default
    assert parsed.names["user_id"] == oa.USER_HEADER
    err = _refused(oa.parse_completion, {"model": "m", "prompt": ["a", "b"]}, "bob")
    assert err.param == "prompt" and "one prompt per request" in err.message


@pytest.mark.parametrize(
    ("body", "param", "code"),
    [
        ({"n": 3}, "n", "unsupported_value"),
        ({"stop": "\n"}, "stop", "unsupported_value"),
        ({"logprobs": True}, "logprobs", "unsupported_value"),
        ({"tools": [{"type": "function"}]}, "tools", "unsupported_value"),
        ({"frobnicate": 1}, "frobnicate", "unknown_parameter"),
        ({"temperature": "0.5"}, "temperature", "invalid_value"),
        ({"max_tokens": True}, "max_tokens", "invalid_value"),
        ({"max_tokens": 0}, "max_tokens", "invalid_value"),
        ({"max_tokens": 4, "max_completion_tokens": 5}, "max_completion_tokens", "invalid_value"),
        ({"messages": [{"role": "user"}]}, "messages[0]", "invalid_value"),
        (
            {"messages": [{"role": "user", "content": [{"type": "image_url"}]}]},
            "messages[0].content[0].type",
            "invalid_value",
        ),
        (
            {"messages": [{"role": "user", "content": "x", "name": "n"}]},
            "messages[0].name",
            "unknown_parameter",
        ),
        ({"stream_options": {"include_usage": True}}, "stream_options", "invalid_value"),
        ({"model": None}, "model", "invalid_value"),
        ({"user": None, "safety_identifier": None}, "user", "missing_required_parameter"),
        ({"safety_identifier": "b"}, "user", "invalid_value"),  # disagrees with user="a"
    ],
)
def test_bad_chat_bodies_name_the_field(body: dict[str, Any], param: str, code: str) -> None:
    raw = {"model": "m", "messages": CHAT, "user": "a", **body}
    err = _refused(oa.parse_chat, raw, None)
    assert (err.status, err.param, err.code) == (400, param, code), err.message
    assert set(err.body()["error"]) == {"message", "type", "param", "code"}


def test_missing_fields_and_bodies_that_are_not_objects() -> None:
    err = _refused(oa.parse_chat, {"model": "m", "user": "a"}, None)
    assert (err.param, err.code) == ("messages", "missing_required_parameter")
    assert _refused(oa.json_object, b"[1]").status == 400
    assert _refused(oa.json_object, b"{nope").code == "invalid_json"


@pytest.mark.parametrize(
    ("code", "status", "kind"),
    [
        (grpc.StatusCode.INVALID_ARGUMENT, 400, "invalid_request_error"),
        (grpc.StatusCode.UNAUTHENTICATED, 401, "authentication_error"),
        (grpc.StatusCode.PERMISSION_DENIED, 403, "permission_error"),
        (grpc.StatusCode.NOT_FOUND, 404, "invalid_request_error"),
        (grpc.StatusCode.RESOURCE_EXHAUSTED, 429, "rate_limit_error"),
        (grpc.StatusCode.UNAVAILABLE, 503, "server_error"),
        (grpc.StatusCode.INTERNAL, 500, "server_error"),
        (grpc.StatusCode.UNKNOWN, 500, "server_error"),
    ],
)
def test_grpc_statuses_map_onto_http(code: grpc.StatusCode, status: int, kind: str) -> None:
    err = oa.from_status(code, "something: retry with backoff")
    assert (err.status, err.type, err.grpc_code) == (status, kind, code)


def test_servicer_messages_name_the_bodys_fields() -> None:
    names = {"sampling.max_tokens": "max_tokens", "user_id": "user", "messages": "messages"}
    names |= {"prompt": "messages", "signals": "signals"}
    err = oa.from_status(grpc.StatusCode.INVALID_ARGUMENT, "sampling.max_tokens=99 is out", names)
    assert (err.param, err.message) == ("max_tokens", "max_tokens=99 is out")
    err = oa.from_status(grpc.StatusCode.INVALID_ARGUMENT, "messages[2].role='x' is unknown", names)
    assert err.param == "messages[2].role"
    err = oa.from_status(grpc.StatusCode.INVALID_ARGUMENT, "signals.thumbs=3: use +1", names)
    assert err.param == "signals.thumbs"
    err = oa.from_status(grpc.StatusCode.INVALID_ARGUMENT, "every message is empty", names)
    assert err.param is None and err.message == "every message is empty"
    # too long a prompt is not worth a retry; an overloaded server is
    long = oa.from_status(grpc.StatusCode.RESOURCE_EXHAUSTED, "prompt is 99 tokens", names)
    assert (long.param, long.code, long.headers) == (
        "messages",
        "context_length_exceeded",
        {"x-should-retry": "false"},
    )
    busy = oa.from_status(grpc.StatusCode.RESOURCE_EXHAUSTED, "full: retry with backoff")
    assert busy.status == 429 and "x-should-retry" not in busy.headers


def test_feedback_signals_follow_the_proto() -> None:
    request, _ = oa.parse_feedback(
        {"request_id": "r", "user": "u", "signals": {"thumbs": -1, "rating": 1, "copied": True}},
        None,
    )
    signals = request.signals
    assert (signals.thumbs, signals.rating, signals.copied) == (-1, 1.0, True)
    assert not signals.HasField("dwell_ms")
    for bad, param in (
        ({"thumbs": True}, "signals.thumbs"),
        ({"copied": 1}, "signals.copied"),
        ({"dwell_ms": 2**70}, "signals.dwell_ms"),
        ({"dwell_ms": 1.5}, "signals.dwell_ms"),
        ({"stars": 5}, "signals.stars"),
    ):
        err = _refused(oa.parse_feedback, {"request_id": "r", "user": "u", "signals": bad}, None)
        assert err.param == param, bad
    assert _refused(oa.parse_feedback, {"user": "u"}, None).param == "request_id"
    err = _refused(oa.parse_feedback, {"request_id": "r", "user": "u", "extra": 1}, None)
    assert err.param == "extra"


def test_response_ids_travel_as_metadata() -> None:
    md = response_metadata("abc.def", 7, "größer arm")
    assert all(v.isascii() for _, v in md)
    assert read_response_metadata(md) == ("abc.def", 7, "größer arm")
    assert read_response_metadata([("other", "x")]) is None
