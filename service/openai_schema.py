"""The OpenAI wire format of the HTTP API (service/openai_api.py): request bodies parsed
into the servicer's own proto requests, its answers and statuses rendered as OpenAI's JSON.

Nothing here validates what the servicer validates (user ids, sampling ranges, prompt
size, roles, feedback signals): a body is only parsed and mapped onto api_pb2 messages,
and the servicer's refusal comes back through `from_status`, which renames the proto
field in its message to the body's (`sampling.max_tokens` -> `max_tokens`) and names it
as the error's `param`. What is refused here is what OpenAI's format has and the proto
does not: unknown fields, and parameters this server does not implement (`n` > 1, `stop`,
`logprobs`, tools, ...), each with a 400 naming the field.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, TypeVar

import grpc
from google.protobuf import descriptor as pb_descriptor
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from loraloop.core.gen.loraloop.v1 import api_pb2, common_pb2

USER_HEADER = "x-loraloop-user"
USER_FIELDS = ("safety_identifier", "user")  # OpenAI's newer name first

# gRPC status -> HTTP status and OpenAI error type
HTTP_STATUS: dict[grpc.StatusCode, tuple[int, str]] = {
    grpc.StatusCode.INVALID_ARGUMENT: (400, "invalid_request_error"),
    grpc.StatusCode.UNAUTHENTICATED: (401, "authentication_error"),
    grpc.StatusCode.PERMISSION_DENIED: (403, "permission_error"),
    grpc.StatusCode.NOT_FOUND: (404, "invalid_request_error"),
    grpc.StatusCode.RESOURCE_EXHAUSTED: (429, "rate_limit_error"),
    grpc.StatusCode.UNAVAILABLE: (503, "server_error"),
    grpc.StatusCode.CANCELLED: (499, "server_error"),
    grpc.StatusCode.DEADLINE_EXCEEDED: (504, "server_error"),
}
INTERNAL = (500, "server_error")


@dataclass
class ApiError(Exception):
    """An answer in OpenAI's error shape: `{"error": {message, type, param, code}}`."""

    status: int
    message: str
    type: str = "invalid_request_error"
    param: str | None = None
    code: str | None = None
    grpc_code: grpc.StatusCode = grpc.StatusCode.INVALID_ARGUMENT
    headers: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        super().__init__(self.message)

    def body(self) -> dict[str, Any]:
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.code,
            }
        }


def bad_request(message: str, param: str | None, code: str | None = "invalid_value") -> ApiError:
    return ApiError(400, message, param=param, code=code)


def from_status(
    code: grpc.StatusCode, message: str, names: Mapping[str, str] | None = None
) -> ApiError:
    """The answer to a servicer's abort(code, message); `names` maps proto field names in
    the message to the body's (see `_rename`)."""
    status, kind = HTTP_STATUS.get(code, INTERNAL)
    param = None
    if names:
        param, message = _rename(message, names)
    err = ApiError(status, message, kind, param, None, code)
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED and "retry" not in message:
        # Too long a prompt: resending it cannot help, and OpenAI's clients retry a 429 by
        # default; the header tells them not to (the overload refusals do say "retry").
        err.code = "context_length_exceeded"
        err.headers["x-should-retry"] = "false"
    elif code == grpc.StatusCode.NOT_FOUND:
        err.code = "not_found"
    elif code == grpc.StatusCode.UNAUTHENTICATED:
        err.code = "invalid_api_key"
    return err


_FIELD_AT_START = re.compile(r"^((?:messages\[\d+\])(?:\.\w+)?|[a-z_]+(?:\.[a-z_]+)?)")


def _rename(message: str, names: Mapping[str, str]) -> tuple[str | None, str]:
    """(param, message) with the proto field the message starts with renamed: `names` maps
    a proto name ("sampling.max_tokens", "user_id", "prompt") to the body's."""
    m = _FIELD_AT_START.match(message)
    if m is None:
        return None, message
    proto = m.group(1)
    for name in (proto, re.split(r"[.\[]", proto, maxsplit=1)[0]):
        if name in names:
            renamed = names[name] + proto[len(name) :]
            return renamed, renamed + message[len(proto) :]
    return None, message


# --- requests -----------------------------------------------------------------------------
class _Body(BaseModel):
    # strict: "temperature": "0.5" or "max_tokens": true are refused, not coerced
    model_config = ConfigDict(strict=True, extra="forbid")


class StreamOptions(_Body):
    include_usage: bool | None = None
    include_obfuscation: bool | None = None  # OpenAI's padding of chunks; nothing to pad here


class TextPart(_Body):
    type: Literal["text"]
    text: str


class ChatMessageIn(_Body):
    role: str
    content: str | list[TextPart] | None = None


class _Generation(_Body):
    model: str
    user: str | None = None
    safety_identifier: str | None = None
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = None
    top_p: float | None = None
    seed: int | None = None
    stream: bool | None = None
    stream_options: StreamOptions | None = None


class ChatRequest(_Generation):
    messages: list[ChatMessageIn]
    max_completion_tokens: int | None = Field(None, ge=1)


class CompletionRequest(_Generation):
    prompt: str | list[str]


# Parameters of OpenAI's API that this server accepts only at their no-op value (null is
# always accepted); any other value is a 400 naming the parameter.
NO_OP_VALUES: dict[str, tuple[Any, ...]] = {
    "n": (1,),
    "presence_penalty": (0,),
    "frequency_penalty": (0,),
    "logprobs": (False,),
    "top_logprobs": (0,),
    "logit_bias": ({},),
    "stop": ([], ""),
    "echo": (False,),
    "best_of": (1,),
    "suffix": ("",),
    "tools": ([],),
    "functions": ([],),
    "store": (False,),
    "response_format": ({"type": "text"},),
    "modalities": (["text"],),
    "parallel_tool_calls": (True, False),
    "metadata": ({},),
}
WHY_NOT: dict[str, str] = {
    "n": "one choice per request: send n=1 (or leave it out) and repeat the request for more",
    "stop": "stop sequences are not supported: the response would differ from what the "
    "learner is told was served; leave stop out",
    "logprobs": "log-probabilities are not returned; leave logprobs out",
    "top_logprobs": "log-probabilities are not returned; leave top_logprobs out",
    "tools": "tool calls are not supported",
    "functions": "function calls are not supported",
    "tool_choice": "tool calls are not supported",
    "response_format": "only plain text responses are supported",
}


def _check_extras(raw: dict[str, Any], model: type[_Body]) -> dict[str, Any]:
    """`raw` without the no-op parameters; raises for parameters the model lacks."""
    known = model.model_fields
    out = {}
    for name, value in raw.items():
        if name in known:
            out[name] = value
        elif value is None or value in NO_OP_VALUES.get(name, ()):
            continue
        elif name in NO_OP_VALUES or name in WHY_NOT:
            why = WHY_NOT.get(name, f"only its default is supported: leave {name} out")
            raise bad_request(
                f"Unsupported value for parameter {name!r}: {why}.", name, "unsupported_value"
            )
        else:
            raise bad_request(
                f"Unrecognized request argument supplied: {name!r} (this server implements "
                f"{', '.join(sorted(known))})",
                name,
                "unknown_parameter",
            )
    return out


_B = TypeVar("_B", bound=_Body)


def _loc(loc: tuple[int | str, ...]) -> str:
    """A pydantic error location as the body's path: messages[0].content."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif part in ("str", "list[TextPart]", "int", "float", "bool", "list[str]"):
            continue  # the branch of a union pydantic tried, not a field
        else:
            out += f".{part}" if out else str(part)
    return out


def _validate(model: type[_B], raw: dict[str, Any]) -> _B:
    try:
        return model.model_validate(raw)
    except ValidationError as exc:
        # the most specific error: of a union (content: str | list of parts), the branch
        # that got deepest into the input
        first = max(exc.errors(), key=lambda e: len(e["loc"]))
        param = _loc(first["loc"])
        if first["type"] == "missing":
            raise bad_request(
                f"Missing required parameter: {param!r}.", param, "missing_required_parameter"
            ) from None
        if first["type"] == "extra_forbidden":
            raise bad_request(
                f"Unrecognized request argument supplied: {param!r}", param, "unknown_parameter"
            ) from None
        shown = repr(first.get("input"))
        shown = shown if len(shown) <= 40 else shown[:40] + "..."
        raise bad_request(
            f"Invalid value for {param!r}: {first['msg']} (got {shown})", param
        ) from None


def json_object(body: bytes) -> dict[str, Any]:
    try:
        raw = json.loads(body)
    except (ValueError, RecursionError) as exc:
        raise bad_request(
            f"We could not parse the JSON body of your request ({exc}): send a JSON object",
            None,
            "invalid_json",
        ) from None
    if not isinstance(raw, dict):
        raise bad_request(
            f"the request body is a JSON {type(raw).__name__}: send a JSON object", None
        )
    return raw


@dataclass
class Generation:
    """A parsed chat or text completion request: the proto request the servicer gets, and
    what the answer needs to know."""

    request: api_pb2.GenerateRequest
    model: str
    stream: bool
    include_usage: bool
    names: dict[str, str]  # proto field -> body field, for the servicer's messages


def user_of(raw: Mapping[str, Any], header: str | None) -> tuple[str, str]:
    """(user id, where it came from): `safety_identifier` or `user` in the body, or the
    x-loraloop-user header; they must agree when several are sent."""
    found = [(raw[name], name) for name in USER_FIELDS if raw.get(name) is not None]
    if header is not None:
        found.append((header, f"the {USER_HEADER} header"))
    if not found:
        raise bad_request(
            "Missing the end user's id: send it as 'user' or 'safety_identifier' in the body, "
            f"or in the {USER_HEADER} header (it picks the user's own adapter and bandit)",
            "user",
            "missing_required_parameter",
        )
    value, source = found[0]
    for other, where in found[1:]:
        if other != value:
            raise bad_request(
                f"{source} and {where} name different users: send one id", USER_FIELDS[1]
            )
    if not isinstance(value, str):
        raise bad_request(f"{source} must be a string, the end user's id", source)
    return value, source if source in USER_FIELDS else USER_HEADER


def _sampling(
    parsed: _Generation, max_tokens: int | None, names: dict[str, str]
) -> common_pb2.SamplingParams:
    sampling = common_pb2.SamplingParams(max_tokens=max_tokens or 0)
    for name in ("temperature", "top_p", "seed"):
        value = getattr(parsed, name)
        if value is not None:
            if name == "seed" and not -(2**63) <= value < 2**63:
                raise bad_request(f"seed={value} is out of range: use a 64-bit integer", "seed")
            setattr(sampling, name, value)
        names[f"sampling.{name}"] = name
    return sampling


def _max_tokens(parsed: _Generation, alias: int | None, names: dict[str, str]) -> int | None:
    if alias is not None and parsed.max_tokens is not None and alias != parsed.max_tokens:
        raise bad_request(
            "max_tokens and max_completion_tokens differ: send one of them",
            "max_completion_tokens",
        )
    names["sampling.max_tokens"] = "max_completion_tokens" if alias is not None else "max_tokens"
    value = alias if alias is not None else parsed.max_tokens
    if value is not None and value >= 2**31:
        raise bad_request(f"{names['sampling.max_tokens']}={value} is out of range", None)
    return value


ROLE_ALIASES = {"developer": "system"}  # OpenAI's newer name of the system role


def parse_chat(raw: dict[str, Any], header_user: str | None) -> Generation:
    user, user_field = user_of(raw, header_user)
    parsed = _validate(ChatRequest, _check_extras(raw, ChatRequest))
    names = {"user_id": user_field, "messages": "messages", "prompt": "messages"}
    messages = []
    for i, message in enumerate(parsed.messages):
        content = message.content
        if isinstance(content, list):
            content = "".join(part.text for part in content)
        elif content is None:
            raise bad_request(f"messages[{i}].content is null: send the text", f"messages[{i}]")
        role = ROLE_ALIASES.get(message.role, message.role)
        messages.append(common_pb2.ChatMessage(role=role, content=content))
    max_tokens = _max_tokens(parsed, parsed.max_completion_tokens, names)
    request = api_pb2.GenerateRequest(
        user_id=user,
        messages=api_pb2.ChatMessages(messages=messages),
        sampling=_sampling(parsed, max_tokens, names),
    )
    return _generation(parsed, request, names)


def parse_completion(raw: dict[str, Any], header_user: str | None) -> Generation:
    user, user_field = user_of(raw, header_user)
    parsed = _validate(CompletionRequest, _check_extras(raw, CompletionRequest))
    names = {"user_id": user_field, "prompt": "prompt"}
    prompt = parsed.prompt
    if isinstance(prompt, list):
        if len(prompt) != 1:
            raise bad_request(
                f"prompt is a list of {len(prompt)} prompts: send one prompt per request",
                "prompt",
                "unsupported_value",
            )
        prompt = prompt[0]
    max_tokens = _max_tokens(parsed, None, names)
    request = api_pb2.GenerateRequest(
        user_id=user, prompt=prompt, sampling=_sampling(parsed, max_tokens, names)
    )
    return _generation(parsed, request, names)


def _generation(
    parsed: _Generation, request: api_pb2.GenerateRequest, names: dict[str, str]
) -> Generation:
    stream = bool(parsed.stream)
    options = parsed.stream_options
    if options is not None and not stream:
        raise bad_request("stream_options is only allowed with stream=true", "stream_options")
    include_usage = bool(options and options.include_usage)
    return Generation(request, parsed.model, stream, include_usage, names)


def parse_feedback(
    raw: dict[str, Any], header_user: str | None
) -> tuple[api_pb2.FeedbackRequest, dict[str, str]]:
    """`{"request_id", "user" | "safety_identifier", "signals": {FeedbackSignals}}`, and
    the names for the servicer's messages."""
    user, user_field = user_of(raw, header_user)
    allowed = {"request_id", "signals", *USER_FIELDS}
    for name in raw:
        if name not in allowed:
            raise bad_request(
                f"Unrecognized request argument supplied: {name!r} (send request_id, user "
                "or safety_identifier, and signals)",
                name,
                "unknown_parameter",
            )
    request_id = raw.get("request_id")
    if not isinstance(request_id, str) or not request_id:
        raise bad_request(
            "Missing required parameter: 'request_id' (the id of the completion, a string)",
            "request_id",
            "missing_required_parameter",
        )
    request = api_pb2.FeedbackRequest(
        request_id=request_id, user_id=user, signals=feedback_signals(raw.get("signals"))
    )
    return request, {"user_id": user_field, "request_id": "request_id", "signals": "signals"}


_SCALARS: dict[int, tuple[type, tuple[int, int] | None]] = {
    pb_descriptor.FieldDescriptor.TYPE_BOOL: (bool, None),
    pb_descriptor.FieldDescriptor.TYPE_FLOAT: (float, None),
    pb_descriptor.FieldDescriptor.TYPE_DOUBLE: (float, None),
    pb_descriptor.FieldDescriptor.TYPE_INT32: (int, (-(2**31), 2**31)),
    pb_descriptor.FieldDescriptor.TYPE_INT64: (int, (-(2**63), 2**63)),
    pb_descriptor.FieldDescriptor.TYPE_STRING: (str, None),  # signals.edited_text
}


def feedback_signals(raw: object) -> common_pb2.FeedbackSignals:
    """FeedbackSignals from a JSON object with its field names (read off the proto, so the
    two never drift apart); only types are checked here, values by the servicer."""
    fields = common_pb2.FeedbackSignals.DESCRIPTOR.fields_by_name
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise bad_request(f"signals must be an object with any of {', '.join(fields)}", "signals")
    signals = common_pb2.FeedbackSignals()
    for name, value in raw.items():
        spec = fields.get(name)
        if spec is None:
            raise bad_request(
                f"signals.{name} is not a signal: send any of {', '.join(fields)}",
                f"signals.{name}",
                "unknown_parameter",
            )
        if value is None:
            continue
        kind, bounds = _SCALARS[spec.type]
        ok = isinstance(value, bool) if kind is bool else not isinstance(value, bool)
        ok = ok and (isinstance(value, int | float) if kind is float else isinstance(value, kind))
        if not ok or (bounds is not None and not bounds[0] <= value < bounds[1]):
            raise bad_request(
                f"signals.{name} must be {'a boolean' if kind is bool else f'a {kind.__name__}'}"
                f"{' in range' if bounds and ok else ''}, not {json.dumps(value)[:40]}",
                f"signals.{name}",
            )
        setattr(signals, name, value)
    return signals


# --- responses ----------------------------------------------------------------------------
def usage(response: api_pb2.GenerateResponse) -> dict[str, int]:
    u = response.usage
    return {
        "prompt_tokens": u.prompt_tokens,
        "completion_tokens": u.completion_tokens,
        "total_tokens": u.prompt_tokens + u.completion_tokens,
    }


def extras(adapter_version: int, arm: str) -> dict[str, Any]:
    """Our fields beside OpenAI's: what the app needs for feedback and to see learning."""
    return {"adapter_version": adapter_version, "arm": arm}


def chat_completion(response: api_pb2.GenerateResponse, model: str) -> dict[str, Any]:
    return {
        "id": response.request_id,
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": response.text},
                "finish_reason": response.finish_reason,
                "logprobs": None,
            }
        ],
        "usage": usage(response),
        **extras(response.adapter_version, response.arm),
    }


def text_completion(response: api_pb2.GenerateResponse, model: str) -> dict[str, Any]:
    return {
        "id": response.request_id,
        "object": "text_completion",
        "created": int(time.time()),
        "model": model,
        "choices": [
            {
                "index": 0,
                "text": response.text,
                "finish_reason": response.finish_reason,
                "logprobs": None,
            }
        ],
        "usage": usage(response),
        **extras(response.adapter_version, response.arm),
    }


@dataclass
class Chunks:
    """The chunks of one streamed answer, chat or text, in OpenAI's format."""

    chat: bool
    model: str
    request_id: str
    adapter_version: int
    arm: str
    created: int = field(default_factory=lambda: int(time.time()))

    def _chunk(self, choice: dict[str, Any] | None, **more: Any) -> dict[str, Any]:
        return {
            "id": self.request_id,
            "object": "chat.completion.chunk" if self.chat else "text_completion",
            "created": self.created,
            "model": self.model,
            "choices": [] if choice is None else [{"index": 0, **choice}],
            **extras(self.adapter_version, self.arm),
            **more,
        }

    def first(self) -> dict[str, Any] | None:
        """The opening chunk (chat: the assistant's role), or None (text)."""
        if not self.chat:
            return None
        return self._chunk(
            {"delta": {"role": "assistant", "content": ""}, "finish_reason": None, "logprobs": None}
        )

    def text(self, delta: str) -> dict[str, Any]:
        body: dict[str, Any] = {"finish_reason": None, "logprobs": None}
        if self.chat:
            body["delta"] = {"content": delta}
        else:
            body["text"] = delta
        return self._chunk(body)

    def last(self, final: api_pb2.GenerateResponse) -> dict[str, Any]:
        key, empty = ("delta", {}) if self.chat else ("text", "")
        return self._chunk({key: empty, "finish_reason": final.finish_reason, "logprobs": None})

    def usage(self, final: api_pb2.GenerateResponse) -> dict[str, Any]:
        return self._chunk(None, usage=usage(final))


def sse(data: Mapping[str, Any]) -> bytes:
    return b"data: " + json.dumps(data, ensure_ascii=False).encode() + b"\n\n"


DONE = b"data: [DONE]\n\n"


def models_list(model_id: str, created: int) -> dict[str, Any]:
    return {
        "object": "list",
        "data": [{"id": model_id, "object": "model", "created": created, "owned_by": "loraloop"}],
    }


def model_not_found(model: str) -> ApiError:
    return ApiError(
        404,
        f"The model {model[:100]!r} does not exist: this server serves the model that GET "
        "/v1/models lists",
        param="model",
        code="model_not_found",
        grpc_code=grpc.StatusCode.NOT_FOUND,
    )


Parser = Callable[[dict[str, Any], str | None], Generation]
