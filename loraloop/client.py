"""A small typed client for the loraloop gRPC API.

    with LoraLoopClient("127.0.0.1:50051") as client:
        reply = client.generate("alice", "How do I boil an egg?")
        client.feedback(reply.request_id, "alice", thumbs=+1)

Every call has a deadline; calls that fail with UNAVAILABLE (server restarting, not yet
up) are retried with exponential backoff by gRPC's own retry policy.

Security comes from arguments or, when they are not given, the environment:
`LORALOOP_API_KEY` is sent as `x-api-key` metadata on every call, and
`LORALOOP_TLS_CA_FILE` (the CA that signed the server's certificate) switches to TLS, with
`LORALOOP_TLS_CLIENT_CERT_FILE` + `LORALOOP_TLS_CLIENT_KEY_FILE` for mutual TLS.
"""

from __future__ import annotations

import json
import os
import threading
from collections import OrderedDict
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from types import TracebackType
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from loraloop.core.gen.loraloop.v1 import api_pb2, api_pb2_grpc, common_pb2


def _service_config(retries: int, load_balancing: str = "pick_first") -> str:
    policy = {
        "maxAttempts": max(2, retries + 1),
        "initialBackoff": "0.1s",
        "maxBackoff": "2s",
        "backoffMultiplier": 2,
        "retryableStatusCodes": ["UNAVAILABLE"],
    }
    return json.dumps(
        {
            "loadBalancingConfig": [{load_balancing: {}}],
            "methodConfig": [
                {"name": [{"service": "loraloop.v1.LoraLoop"}], "retryPolicy": policy}
            ],
        }
    )


API_KEY_ENV = "LORALOOP_API_KEY"
TLS_CA_ENV = "LORALOOP_TLS_CA_FILE"
TLS_CERT_ENV = "LORALOOP_TLS_CLIENT_CERT_FILE"
TLS_KEY_ENV = "LORALOOP_TLS_CLIENT_KEY_FILE"


def api_key_metadata(api_key: str | None = None) -> tuple[tuple[str, str], ...] | None:
    """Call metadata carrying `api_key` (default: $LORALOOP_API_KEY); None without a key."""
    key = api_key if api_key is not None else os.environ.get(API_KEY_ENV, "")
    return (("x-api-key", key),) if key else None


def tls_credentials(
    ca_file: str | None = None, cert_file: str | None = None, key_file: str | None = None
) -> grpc.ChannelCredentials | None:
    """TLS channel credentials from PEM files (default: the LORALOOP_TLS_* variables); None
    when no CA is given, i.e. plaintext."""
    ca_file = ca_file or os.environ.get(TLS_CA_ENV) or None
    cert_file = cert_file or os.environ.get(TLS_CERT_ENV) or None
    key_file = key_file or os.environ.get(TLS_KEY_ENV) or None
    if ca_file is None:
        if cert_file or key_file:
            raise ValueError(f"a client certificate needs the server's CA too: set {TLS_CA_ENV}")
        return None
    if bool(cert_file) != bool(key_file):
        raise ValueError(f"mutual TLS needs both {TLS_CERT_ENV} and {TLS_KEY_ENV}")
    return grpc.ssl_channel_credentials(_read(ca_file), _read(key_file), _read(cert_file))


def _read(path: str | None) -> bytes | None:
    if not path:
        return None
    with open(path, "rb") as f:
        return f.read()


@dataclass(frozen=True)
class Reply:
    request_id: str
    text: str
    adapter_version: int
    arm: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str

    @classmethod
    def from_proto(cls, msg: api_pb2.GenerateResponse) -> Reply:
        return cls(
            msg.request_id,
            msg.text,
            msg.adapter_version,
            msg.arm,
            msg.usage.prompt_tokens,
            msg.usage.completion_tokens,
            msg.finish_reason,
        )


@dataclass(frozen=True)
class UserStateView:
    user_id: str
    adapter_version: int
    updates: int
    recent_reward: float
    arms: tuple[tuple[str, int, float], ...] = ()  # (arm, pulls, mean reward)


SESSION_USERS = 10_000  # users whose newest adapter version a client remembers


class LoraLoopClient:
    """A client of the gRPC API. It remembers the newest adapter version it was served per
    user (the most recent SESSION_USERS users) and sends it as
    GenerateRequest.min_adapter_version, so that behind a load balancer spreading calls
    over replicas a user never gets an older adapter than this client had before."""

    def __init__(
        self,
        target: str,
        *,
        timeout: float = 30.0,
        retries: int = 4,
        credentials: grpc.ChannelCredentials | None = None,
        api_key: str | None = None,
        load_balancing: str = "pick_first",
    ) -> None:
        """`target`: host:port, or any gRPC name, e.g. "dns:///loraloop-server:50051" or
        "ipv4:10.0.0.1:50051,10.0.0.2:50051"; with `load_balancing="round_robin"` calls are
        spread over every address the name resolves to (server replicas)."""
        options = [
            ("grpc.service_config", _service_config(retries, load_balancing)),
            ("grpc.enable_retries", 1),
        ]
        credentials = credentials or tls_credentials()
        self._channel = (
            grpc.secure_channel(target, credentials, options)
            if credentials
            else grpc.insecure_channel(target, options)
        )
        self._stub = api_pb2_grpc.LoraLoopStub(self._channel)
        self._health = health_pb2_grpc.HealthStub(self._channel)
        self.timeout = timeout
        self._metadata = api_key_metadata(api_key)
        self._seen: OrderedDict[str, int] = OrderedDict()  # user -> newest version served
        self._seen_lock = threading.Lock()

    def _floor(self, request: api_pb2.GenerateRequest) -> api_pb2.GenerateRequest:
        with self._seen_lock:
            request.min_adapter_version = self._seen.get(request.user_id, 0)
        return request

    def _served(self, user_id: str, reply: Reply) -> Reply:
        with self._seen_lock:
            if reply.adapter_version >= self._seen.get(user_id, 0):
                self._seen[user_id] = reply.adapter_version
                self._seen.move_to_end(user_id)
                while len(self._seen) > SESSION_USERS:
                    self._seen.popitem(last=False)
        return reply

    def forget_user(self, user_id: str) -> None:
        """Drop the floor remembered for a user (done by delete_user)."""
        with self._seen_lock:
            self._seen.pop(user_id, None)

    # --- lifecycle ----------------------------------------------------------------------
    def wait_ready(self, timeout: float = 60.0) -> None:
        """Block until the server's health check says SERVING."""
        grpc.channel_ready_future(self._channel).result(timeout=timeout)
        status = self._health.Check(
            health_pb2.HealthCheckRequest(service=""), timeout=timeout
        ).status
        if status != health_pb2.HealthCheckResponse.SERVING:
            raise RuntimeError(
                f"server health is {health_pb2.HealthCheckResponse.ServingStatus.Name(status)}"
            )

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> LoraLoopClient:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # --- calls --------------------------------------------------------------------------
    @staticmethod
    def _request(
        user_id: str,
        prompt: str | None,
        messages: list[tuple[str, str]] | None,
        max_tokens: int,
        temperature: float | None,
        top_p: float | None,
        seed: int | None,
        arm: str | None = None,
        regenerates: str | None = None,
        context: Mapping[str, float | int | str] | None = None,
    ) -> api_pb2.GenerateRequest:
        sampling: dict[str, Any] = {"max_tokens": max_tokens}
        for name, value in (("temperature", temperature), ("top_p", top_p), ("seed", seed)):
            if value is not None:
                sampling[name] = value
        request = api_pb2.GenerateRequest(
            user_id=user_id,
            sampling=common_pb2.SamplingParams(**sampling),
            arm=arm or "",
            regenerates=regenerates or "",
        )
        for feature, given in (context or {}).items():
            if isinstance(given, str):
                request.context.categorical[feature] = given
            elif isinstance(given, int | float) and not isinstance(given, bool):
                request.context.numeric[feature] = float(given)
            else:
                raise TypeError(
                    f"context[{feature!r}] is a {type(given).__name__}: send a number (numeric "
                    "feature) or a string (categorical feature)"
                )
        if messages is not None:
            request.messages.messages.extend(
                common_pb2.ChatMessage(role=r, content=c) for r, c in messages
            )
        else:
            request.prompt = prompt or ""
        return request

    def generate(
        self,
        user_id: str,
        prompt: str | None = None,
        *,
        messages: list[tuple[str, str]] | None = None,
        max_tokens: int = 0,
        temperature: float | None = None,
        top_p: float | None = None,
        seed: int | None = None,
        arm: str | None = None,
        regenerates: str | None = None,
        context: Mapping[str, float | int | str] | None = None,
        timeout: float | None = None,
    ) -> Reply:
        """One response for `user_id`; `arm` pins a response strategy (else the bandit picks);
        `regenerates`: the request_id of the response this one replaces (the user asked
        again; send the same input); `context`: the request's context features for the
        bandit, as the server's context schema declares them, e.g. {"hour": 13, "device":
        "mobile"} (numbers are numeric features, strings categorical ones)."""
        request = self._request(
            user_id,
            prompt,
            messages,
            max_tokens,
            temperature,
            top_p,
            seed,
            arm,
            regenerates,
            context,
        )
        response = self._stub.Generate(
            self._floor(request), timeout=timeout or self.timeout, metadata=self._metadata
        )
        return self._served(user_id, Reply.from_proto(response))

    def stream(
        self,
        user_id: str,
        prompt: str | None = None,
        *,
        messages: list[tuple[str, str]] | None = None,
        max_tokens: int = 0,
        temperature: float | None = None,
        top_p: float | None = None,
        seed: int | None = None,
        arm: str | None = None,
        regenerates: str | None = None,
        context: Mapping[str, float | int | str] | None = None,
        timeout: float | None = None,
    ) -> Iterator[str | Reply]:
        """Yield text deltas as they arrive, then the final Reply (arguments as `generate`)."""
        request = self._request(
            user_id,
            prompt,
            messages,
            max_tokens,
            temperature,
            top_p,
            seed,
            arm,
            regenerates,
            context,
        )
        for msg in self._stub.GenerateStream(
            self._floor(request), timeout=timeout or self.timeout, metadata=self._metadata
        ):
            if msg.HasField("final"):
                yield self._served(user_id, Reply.from_proto(msg.final))
            elif msg.delta:
                yield msg.delta

    def feedback(
        self,
        request_id: str,
        user_id: str,
        *,
        thumbs: int | None = None,
        rating: float | None = None,
        accepted: bool | None = None,
        copied: bool | None = None,
        regenerated: bool | None = None,
        edited: bool | None = None,
        follow_up: bool | None = None,
        dwell_ms: int | None = None,
        edited_text: str | None = None,
        timeout: float | None = None,
    ) -> bool:
        """Report what the user did with a response: True when the feedback will count,
        False when it will not (a repeat, too late, or the user was deleted since; the
        server's FeedbackResponse.reason says which). `edited_text`: the response as the
        user edited it, whole."""
        given = {
            "thumbs": thumbs,
            "rating": rating,
            "accepted": accepted,
            "copied": copied,
            "regenerated": regenerated,
            "edited": edited,
            "follow_up": follow_up,
            "dwell_ms": dwell_ms,
            "edited_text": edited_text,
        }
        signals = common_pb2.FeedbackSignals()
        for name, value in given.items():
            if value is not None:
                setattr(signals, name, value)
        response = self._stub.Feedback(
            api_pb2.FeedbackRequest(request_id=request_id, user_id=user_id, signals=signals),
            timeout=timeout or self.timeout,
            metadata=self._metadata,
        )
        return response.accepted

    def user_state(self, user_id: str, timeout: float | None = None) -> UserStateView:
        msg = self._stub.GetUserState(
            api_pb2.GetUserStateRequest(user_id=user_id),
            timeout=timeout or self.timeout,
            metadata=self._metadata,
        )
        return UserStateView(
            msg.user_id,
            msg.adapter_version,
            msg.updates,
            msg.recent_reward,
            tuple((a.arm, a.pulls, a.mean_reward) for a in msg.arms),
        )

    def delete_user(self, user_id: str, timeout: float | None = None) -> bool:
        """Forget a user everywhere; True when something of theirs existed."""
        self.forget_user(user_id)
        msg = self._stub.DeleteUser(
            api_pb2.DeleteUserRequest(user_id=user_id),
            timeout=timeout or self.timeout,
            metadata=self._metadata,
        )
        return msg.deleted
