"""What every call to the server passes through last, right around the servicer:

- a request whose bytes do not parse (corrupt wire format, a string field that is not
  UTF-8) is answered INVALID_ARGUMENT naming the method and the fault; grpc alone answers
  it UNKNOWN ("Unexpected DecodeError") from inside its deserializer;
- the generating methods are admitted through a `ConcurrencyLimit`: one call beyond it is
  refused with RESOURCE_EXHAUSTED at once instead of queueing without bound;
- an exception the servicer did not turn into a status (a bug) is logged with its
  traceback and answered INTERNAL with a message, instead of UNKNOWN with the exception's
  text.

It is the innermost interceptor: metrics and auth, outside it, see and count its answers
(a request that did not parse reaches them as a `Malformed` marker with no user_id).
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Collection
from dataclasses import dataclass
from typing import Any

import grpc
from google.protobuf.message import DecodeError

from loraloop.service.admission import ConcurrencyLimit
from loraloop.service.validation import RequestError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Malformed:
    """Stands in for a request whose bytes did not parse."""

    error: str
    size: int
    user_id: str = ""  # what outer interceptors may read off a request
    request_id: str = ""


def safe_deserializer(deserialize: Callable[[bytes], Any]) -> Callable[[bytes], Any]:
    """`deserialize`, returning a `Malformed` marker instead of raising."""

    def parse(data: bytes) -> Any:
        try:
            return deserialize(data)
        except (DecodeError, UnicodeDecodeError, ValueError) as exc:
            # upb prefixes the message type; the reason after it is what a caller can fix
            reason = str(exc).rpartition(": ")[2] or type(exc).__name__
            return Malformed(reason, len(data))

    return parse


def _unparsable(method: str, bad: Malformed) -> str:
    return (
        f"the {bad.size}-byte request to {method} is not a valid message ({bad.error}): "
        "send a serialized protobuf of the method's request type, with UTF-8 strings"
    )


def failure_message(method: str, exc: Exception) -> str:
    """Logs `exc` with its traceback; the INTERNAL message that answers it (both front doors)."""
    log.error("%s failed", method, exc_info=exc)
    return (
        f"{method} failed inside the server ({type(exc).__name__}), a bug: retry, and "
        "report it if it persists"
    )


class CallGuard(grpc.aio.ServerInterceptor):
    """Guards the single-request methods of `service` (others pass untouched); `limit`
    admits the calls to `limited` (bare method names, e.g. "Generate")."""

    def __init__(self, service: str, limit: ConcurrencyLimit, limited: Collection[str]) -> None:
        self.prefix = f"/{service}/"
        self.limit = limit
        self.limited = frozenset(limited)

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        method = handler_call_details.method
        if (
            handler is None
            or not method.startswith(self.prefix)
            or handler.request_streaming
            or handler.request_deserializer is None
        ):
            return handler
        limit = self.limit if method[len(self.prefix) :] in self.limited else None
        deserializer = safe_deserializer(handler.request_deserializer)
        if handler.unary_unary is not None and inspect.iscoroutinefunction(handler.unary_unary):
            return grpc.unary_unary_rpc_method_handler(
                _guard_unary(handler.unary_unary, method, limit),
                request_deserializer=deserializer,
                response_serializer=handler.response_serializer,
            )
        if handler.unary_stream is not None and inspect.isasyncgenfunction(handler.unary_stream):
            return grpc.unary_stream_rpc_method_handler(
                _guard_stream(handler.unary_stream, method, limit),
                request_deserializer=deserializer,
                response_serializer=handler.response_serializer,
            )
        return handler  # a sync handler: not this server's servicer


async def _admit(
    request: Any, context: grpc.aio.ServicerContext, method: str, limit: ConcurrencyLimit | None
) -> None:
    """Abort the call unless its request parsed and, if limited, it got a place."""
    if isinstance(request, Malformed):
        await context.abort(grpc.StatusCode.INVALID_ARGUMENT, _unparsable(method, request))
    if limit is not None:
        try:
            limit.enter()
        except RequestError as err:
            await context.abort(err.code, err.message)


def _guard_unary(
    behavior: Callable[[Any, grpc.aio.ServicerContext], Awaitable[Any]],
    method: str,
    limit: ConcurrencyLimit | None,
) -> Callable[[Any, grpc.aio.ServicerContext], Awaitable[Any]]:
    async def unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
        await _admit(request, context, method, limit)
        try:
            return await behavior(request, context)
        except grpc.aio.AbortError:
            raise
        except Exception as exc:
            await context.abort(grpc.StatusCode.INTERNAL, failure_message(method, exc))
        finally:
            if limit is not None:
                limit.leave()

    return unary


def _guard_stream(
    behavior: Callable[[Any, grpc.aio.ServicerContext], AsyncIterator[Any]],
    method: str,
    limit: ConcurrencyLimit | None,
) -> Callable[[Any, grpc.aio.ServicerContext], AsyncIterator[Any]]:
    async def stream(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        await _admit(request, context, method, limit)
        try:
            async for response in behavior(request, context):
                yield response
        except grpc.aio.AbortError:
            raise
        except Exception as exc:
            await context.abort(grpc.StatusCode.INTERNAL, failure_message(method, exc))
        finally:
            if limit is not None:
                limit.leave()

    return stream
