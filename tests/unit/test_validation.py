"""Request validation: the right gRPC status, and a message naming the field."""

from __future__ import annotations

import math

import grpc
import pytest

from loraloop.core.gen.loraloop.v1 import api_pb2, common_pb2
from loraloop.core.settings import Settings
from loraloop.service.validation import (
    MAX_PROMPT_CHARS,
    RequestError,
    check_input,
    check_sampling,
    check_signals,
    check_user,
)

INVALID = grpc.StatusCode.INVALID_ARGUMENT


@pytest.fixture(scope="module")
def settings() -> Settings:
    return Settings(max_new_tokens=100)


def _fails(fn, *args, code=INVALID, field: str) -> RequestError:
    with pytest.raises(RequestError) as info:
        fn(*args)
    err = info.value
    assert err.code == code
    assert field in err.message, err.message
    assert str(err) == err.message
    return err


# --- user ids ---------------------------------------------------------------------------


@pytest.mark.parametrize("bad", ["", "..", ".", "a/b", "x" * 129, "a b", "ü"])
def test_bad_user_ids(bad: str) -> None:
    _fails(check_user, bad, field="user_id")


@pytest.mark.parametrize("good", ["alice", "a.b@c-d_e", "x" * 128, "0"])
def test_good_user_ids(good: str) -> None:
    assert check_user(good) == good


# --- input ------------------------------------------------------------------------------


def _chat(*pairs: tuple[str, str]) -> api_pb2.GenerateRequest:
    msgs = [common_pb2.ChatMessage(role=r, content=c) for r, c in pairs]
    return api_pb2.GenerateRequest(user_id="u", messages=api_pb2.ChatMessages(messages=msgs))


def test_prompt_ok() -> None:
    assert check_input(api_pb2.GenerateRequest(user_id="u", prompt="hi")) == ("hi", None)


def test_messages_ok() -> None:
    prompt, messages = check_input(_chat(("system", "be brief"), ("user", "hi")))
    assert prompt is None
    assert messages == [("system", "be brief"), ("user", "hi")]


@pytest.mark.parametrize("prompt", ["", "   ", "\n\t"])
def test_empty_prompt(prompt: str) -> None:
    # "" is the proto default, so set the oneof explicitly via a message with prompt=""
    req = api_pb2.GenerateRequest(user_id="u")
    req.prompt = prompt
    assert req.WhichOneof("input") == "prompt"
    _fails(check_input, req, field="prompt is empty")


def test_no_input_at_all() -> None:
    err = _fails(check_input, api_pb2.GenerateRequest(user_id="u"), field="prompt")
    assert "messages" in err.message


def test_prompt_too_long() -> None:
    req = api_pb2.GenerateRequest(user_id="u", prompt="x" * (MAX_PROMPT_CHARS + 1))
    _fails(check_input, req, code=grpc.StatusCode.RESOURCE_EXHAUSTED, field="prompt")
    ok = api_pb2.GenerateRequest(user_id="u", prompt="x" * MAX_PROMPT_CHARS)
    assert check_input(ok)[0] is not None


def test_empty_messages_list() -> None:
    req = api_pb2.GenerateRequest(user_id="u", messages=api_pb2.ChatMessages())
    _fails(check_input, req, field="messages is empty")


@pytest.mark.parametrize("role", ["admin", "User", "", "tool"])
def test_bad_role(role: str) -> None:
    err = _fails(check_input, _chat(("user", "hi"), (role, "x")), field="messages[1].role")
    assert "system" in err.message and "assistant" in err.message


def test_message_too_long() -> None:
    req = _chat(("user", "hi"), ("user", "y" * (MAX_PROMPT_CHARS + 1)))
    _fails(check_input, req, code=grpc.StatusCode.RESOURCE_EXHAUSTED, field="messages[1]")


def test_all_messages_blank() -> None:
    _fails(check_input, _chat(("system", " "), ("user", "")), field="message")


# --- sampling ---------------------------------------------------------------------------


def test_sampling_defaults(settings: Settings) -> None:
    d = check_sampling(common_pb2.SamplingParams(), settings)
    assert (d.max_tokens, d.temperature, d.top_p, d.seed) == (64, 1.0, 1.0, None)
    small = check_sampling(common_pb2.SamplingParams(), Settings(max_new_tokens=10))
    assert small.max_tokens == 10


def test_sampling_values_pass_through(settings: Settings) -> None:
    d = check_sampling(
        common_pb2.SamplingParams(max_tokens=100, temperature=0.0, top_p=0.5, seed=7), settings
    )
    assert (d.max_tokens, d.temperature, d.top_p, d.seed) == (100, 0.0, 0.5, 7)
    d = check_sampling(common_pb2.SamplingParams(seed=0), settings)
    assert d.seed == 0  # an explicit seed 0 is a seed, not "unset"


@pytest.mark.parametrize("max_tokens", [-1, 101, 10**6])
def test_max_tokens_out_of_range(settings: Settings, max_tokens: int) -> None:
    err = _fails(
        check_sampling,
        common_pb2.SamplingParams(max_tokens=max_tokens),
        settings,
        field="sampling.max_tokens",
    )
    assert str(max_tokens) in err.message and "100" in err.message


@pytest.mark.parametrize("temperature", [math.nan, math.inf, -math.inf, -0.5, 10.5])
def test_bad_temperature(settings: Settings, temperature: float) -> None:
    _fails(
        check_sampling,
        common_pb2.SamplingParams(temperature=temperature),
        settings,
        field="sampling.temperature",
    )


@pytest.mark.parametrize("top_p", [0.0, 1.5, -0.1, math.nan, math.inf])
def test_bad_top_p(settings: Settings, top_p: float) -> None:
    _fails(check_sampling, common_pb2.SamplingParams(top_p=top_p), settings, field="sampling.top_p")


@pytest.mark.parametrize(("t", "p"), [(10.0, 1.0), (0.0, 1e-6)])
def test_sampling_bounds_are_inclusive(settings: Settings, t: float, p: float) -> None:
    d = check_sampling(common_pb2.SamplingParams(temperature=t, top_p=p), settings)
    assert d.temperature == pytest.approx(t) and d.top_p == pytest.approx(p)


# --- feedback signals -------------------------------------------------------------------


def test_empty_signals() -> None:
    err = _fails(check_signals, common_pb2.FeedbackSignals(), field="signals is empty")
    assert "thumbs" in err.message


@pytest.mark.parametrize("thumbs", [2, 0, -2])
def test_bad_thumbs(thumbs: int) -> None:
    _fails(check_signals, common_pb2.FeedbackSignals(thumbs=thumbs), field="signals.thumbs")


@pytest.mark.parametrize("rating", [1.5, -0.01, math.nan, math.inf])
def test_bad_rating(rating: float) -> None:
    _fails(check_signals, common_pb2.FeedbackSignals(rating=rating), field="signals.rating")


def test_bad_dwell() -> None:
    _fails(check_signals, common_pb2.FeedbackSignals(dwell_ms=-1), field="signals.dwell_ms")


@pytest.mark.parametrize(
    "kw",
    [
        dict(thumbs=1),
        dict(thumbs=-1),
        dict(rating=0.0),
        dict(rating=1.0),
        dict(accepted=False),
        dict(copied=False),
        dict(dwell_ms=0),
        dict(regenerated=True, edited=True, follow_up=False),
    ],
)
def test_good_signals(kw: dict) -> None:
    assert check_signals(common_pb2.FeedbackSignals(**kw)) is None
