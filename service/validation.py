"""Request checks: each failure names the field and says what to send instead."""

from __future__ import annotations

import math
from dataclasses import dataclass

import grpc

from core.gen.loraloop.v1 import api_pb2, common_pb2
from core.settings import Settings
from core.user_ids import user_id_error

ROLES = ("system", "user", "assistant")
MAX_PROMPT_CHARS = 100_000


class RequestError(Exception):
    """A request the server refuses, with the gRPC status to answer it with."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def invalid(message: str) -> RequestError:
    return RequestError(grpc.StatusCode.INVALID_ARGUMENT, message)


def check_user(user_id: str) -> str:
    error = user_id_error(user_id)
    if error:
        raise invalid(error)
    return user_id


@dataclass
class Decoding:
    max_tokens: int
    temperature: float
    top_p: float
    seed: int | None


def check_sampling(params: common_pb2.SamplingParams, settings: Settings) -> Decoding:
    limit = settings.max_new_tokens
    if params.max_tokens < 0 or params.max_tokens > limit:
        raise invalid(
            f"sampling.max_tokens={params.max_tokens} is out of range: use 1..{limit}"
            " (0 for the default)"
        )
    temperature = params.temperature if params.HasField("temperature") else 1.0
    if not math.isfinite(temperature) or not 0 <= temperature <= 10:
        raise invalid(f"sampling.temperature={temperature} is out of range: use 0 (greedy) to 10")
    top_p = params.top_p if params.HasField("top_p") else 1.0
    if not math.isfinite(top_p) or not 0 < top_p <= 1:
        raise invalid(f"sampling.top_p={top_p} is out of range: use a value in (0, 1]")
    seed = params.seed if params.HasField("seed") else None
    return Decoding(params.max_tokens or min(64, limit), temperature, top_p, seed)


def check_input(
    request: api_pb2.GenerateRequest,
) -> tuple[str | None, list[tuple[str, str]] | None]:
    """(prompt, None) or (None, messages) from a GenerateRequest."""
    which = request.WhichOneof("input")
    if which is None:
        raise invalid("no input: set either prompt or messages")
    if which == "prompt":
        if not request.prompt.strip():
            raise invalid("prompt is empty: send the text to respond to")
        if len(request.prompt) > MAX_PROMPT_CHARS:
            raise RequestError(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"prompt has {len(request.prompt)} characters: the limit is {MAX_PROMPT_CHARS}",
            )
        return request.prompt, None
    messages = [(m.role, m.content) for m in request.messages.messages]
    if not messages:
        raise invalid("messages is empty: send at least one message")
    for i, (role, content) in enumerate(messages):
        if role not in ROLES:
            raise invalid(f"messages[{i}].role={role!r} is unknown: use one of {', '.join(ROLES)}")
        if len(content) > MAX_PROMPT_CHARS:
            raise RequestError(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"messages[{i}] is too long: the limit is {MAX_PROMPT_CHARS}",
            )
    if not any(content.strip() for _, content in messages):
        raise invalid("every message is empty: send some text")
    return None, messages


def check_signals(signals: common_pb2.FeedbackSignals) -> None:
    present = [f.name for f, _ in signals.ListFields()]
    if not present:
        raise invalid(
            "signals is empty: send at least one of thumbs, rating, accepted, copied,"
            " regenerated, edited, follow_up, dwell_ms"
        )
    if signals.HasField("thumbs") and signals.thumbs not in (-1, 1):
        raise invalid(f"signals.thumbs={signals.thumbs}: use +1 (up) or -1 (down)")
    if signals.HasField("rating") and not (
        math.isfinite(signals.rating) and 0 <= signals.rating <= 1
    ):
        raise invalid(f"signals.rating={signals.rating}: use a value in [0, 1]")
    if signals.HasField("dwell_ms") and signals.dwell_ms < 0:
        raise invalid(f"signals.dwell_ms={signals.dwell_ms}: must be >= 0")
