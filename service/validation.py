"""Request checks: each failure names the field and says what to send instead."""

from __future__ import annotations

import math
from dataclasses import dataclass

import grpc

from loraloop.core.bandits.context_schema import (
    MAX_FEATURES,
    MAX_NAME_CHARS,
    MAX_VALUE_CHARS,
    ContextSchema,
)
from loraloop.core.event_checks import signals_error
from loraloop.core.gen.loraloop.v1 import api_pb2, common_pb2
from loraloop.core.settings import Settings
from loraloop.core.user_ids import user_id_error
from loraloop.service.request_ids import Ownership

ROLES = ("system", "user", "assistant")
MAX_PROMPT_CHARS = 100_000  # default of Settings.max_prompt_chars
MAX_MESSAGES = 1_000
MAX_ARM_CHARS = 128
MAX_EDIT_CHARS = 16_000  # default of Settings.preference_max_edit_chars
_SHOWN_CHARS = 40  # how much of a refused value a message quotes back


def shown(value: str) -> str:
    """`value` quoted for an error message, cut short: a status message stays small
    (gRPC carries it in a header) whatever the client sent."""
    if len(value) <= _SHOWN_CHARS:
        return repr(value)
    return f"{value[:_SHOWN_CHARS]!r}... ({len(value)} characters)"


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
    request: api_pb2.GenerateRequest, max_chars: int = MAX_PROMPT_CHARS
) -> tuple[str | None, list[tuple[str, str]] | None]:
    """(prompt, None) or (None, messages) from a GenerateRequest.

    A prompt, or all chat messages together, may hold at most `max_chars` characters (the
    token limit is checked once the text is encoded; this bound keeps the encoding cheap).
    """
    which = request.WhichOneof("input")
    if which is None:
        raise invalid("no input: set either prompt or messages")
    if which == "prompt":
        if not request.prompt.strip():
            raise invalid("prompt is empty: send the text to respond to")
        if len(request.prompt) > max_chars:
            raise RequestError(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"prompt has {len(request.prompt)} characters: the limit is {max_chars};"
                " shorten it",
            )
        return request.prompt, None
    messages = [(m.role, m.content) for m in request.messages.messages]
    if not messages:
        raise invalid("messages is empty: send at least one message")
    if len(messages) > MAX_MESSAGES:
        raise RequestError(
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            f"messages has {len(messages)} entries: the limit is {MAX_MESSAGES}; send the"
            " most recent turns only",
        )
    total = 0
    for i, (role, content) in enumerate(messages):
        if role not in ROLES:
            raise invalid(
                f"messages[{i}].role={shown(role)} is unknown: use one of {', '.join(ROLES)}"
            )
        if len(content) > max_chars:
            raise RequestError(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"messages[{i}] is too long: the limit is {max_chars} characters",
            )
        total += len(content)
    if total > max_chars:
        raise RequestError(
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            f"messages hold {total} characters together: the limit is {max_chars}; send"
            " fewer or shorter turns",
        )
    if not any(content.strip() for _, content in messages):
        raise invalid("every message is empty: send some text")
    return None, messages


def check_arm(arm: str) -> str | None:
    """The pinned arm name, or None to let the bandit choose (the arm list is the
    strategy's to check; this only bounds the name)."""
    if len(arm) > MAX_ARM_CHARS:
        raise invalid(
            f"arm is {len(arm)} characters long: arm names have at most {MAX_ARM_CHARS};"
            " leave it empty to let the bandit choose"
        )
    return arm or None


def check_adapter_floor(floor: int) -> int:
    """GenerateRequest.min_adapter_version: 0 (none) or a version a server returned."""
    if floor < 0:
        raise invalid(
            f"min_adapter_version is {floor}: send 0, or the adapter_version a previous "
            "response returned for this user"
        )
    return floor


def check_signals(
    signals: common_pb2.FeedbackSignals, max_edit_chars: int = MAX_EDIT_CHARS
) -> None:
    error = signals_error(signals)
    if error:
        raise invalid(error)
    if signals.HasField("edited_text"):
        edit = signals.edited_text
        if not edit.strip():
            raise invalid(
                "signals.edited_text is empty: send the response as the user edited it, "
                "or leave it unset"
            )
        if len(edit) > max_edit_chars:
            raise invalid(
                f"signals.edited_text has {len(edit)} characters: the limit is "
                f"{max_edit_chars} (setting preference_max_edit_chars); send a shorter "
                "edit, or leave it unset"
            )


def check_regenerates(request_id: str, owner: Ownership) -> str:
    """GenerateRequest.regenerates: empty, or an id this service issued to the request's
    user (`owner` is what the request-id MACs say of it)."""
    if not request_id:
        return ""
    if owner is Ownership.OTHER_USER:
        raise RequestError(
            grpc.StatusCode.PERMISSION_DENIED,
            "regenerates names a request_id issued to another user_id: a user can only "
            "regenerate a response served to them",
        )
    if owner is not Ownership.USER:
        raise invalid(
            f"regenerates={shown(request_id)} is not a request_id this service issued to "
            "this user_id: pass the request_id that Generate returned for the response "
            "being replaced, or leave it empty"
        )
    return request_id


def check_context(
    context: common_pb2.ContextFeatures, schema: ContextSchema
) -> tuple[dict[str, float], dict[str, str]]:
    """GenerateRequest.context against the server's context schema: (numeric, categorical)
    features, every name declared with its type, numbers finite, within size bounds."""
    numeric, categorical = dict(context.numeric), dict(context.categorical)
    if not numeric and not categorical:
        return numeric, categorical
    if not schema.declared:
        raise invalid(
            "context is set but this server has no context schema: declare the features "
            "in a schema file and set LORALOOP_CONTEXT_SCHEMA_FILE (server and learner), or "
            "send no context"
        )
    version = f"context schema version {schema.version}"
    count = len(numeric) + len(categorical)
    if count > MAX_FEATURES:
        raise invalid(f"context has {count} features: at most {MAX_FEATURES} ({version})")
    for kind, given in (("numeric", numeric), ("categorical", categorical)):
        for name in given:
            if len(name) > MAX_NAME_CHARS:
                raise invalid(
                    f"context.{kind} feature name {shown(name)} is {len(name)} characters: "
                    f"at most {MAX_NAME_CHARS}"
                )
            feature = schema.by_name.get(name)
            if feature is None:
                declared = ", ".join(f.name for f in schema.features) or "none"
                raise invalid(
                    f"context.{kind} feature {shown(name)} is not in {version} (declared: "
                    f"{declared}); declare it in the schema file (with a new version) or "
                    "leave it out"
                )
            if feature.type != kind:
                raise invalid(
                    f"context feature {shown(name)} is {feature.type} in {version}: send it "
                    f"in context.{feature.type}, not context.{kind}"
                )
    for name, value in numeric.items():
        if not math.isfinite(value):
            raise invalid(
                f"context.numeric[{shown(name)}]={value} is not a finite number ({version})"
            )
    for name, text in categorical.items():
        if len(text) > MAX_VALUE_CHARS:
            raise invalid(
                f"context.categorical[{shown(name)}] is {len(text)} characters: at most "
                f"{MAX_VALUE_CHARS} ({version})"
            )
    return numeric, categorical
