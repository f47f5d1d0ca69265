"""The OpenAI-compatible HTTP API: a second front door onto the same request path.

Routes (on `LORALOOP_HTTP_PORT`, same host and process as gRPC; HTTPS with its TLS files):

- POST /v1/chat/completions, POST /v1/completions (`stream: true`: server-sent events in
  OpenAI's chunk format, ending with `data: [DONE]`);
- GET /v1/models: the one base model, whose id (`LORALOOP_MODEL_ID`, else the model path)
  requests must name as `model`;
- POST /v1/feedback (ours): `{"request_id", "user", "signals": {FeedbackSignals}}`;
- GET /health[?service=loraloop.v1.LoraLoop]: the gRPC health service's answer, 200
  SERVING or 503 (for HTTP probes).

Nothing is served twice. A handler parses the body into the servicer's own request
(api_pb2.GenerateRequest, FeedbackRequest; service/openai_schema.py) and calls the same
`LoraLoopService` method the gRPC server calls, with an `HttpContext` in place of grpc's
ServicerContext: its abort(code, message) raises `CallAborted`, which is answered with
the HTTP status and OpenAI error JSON for that code. Around the call, what the gRPC
interceptors do is done by the same objects: `AuthInterceptor.check` with the bearer key
(the same scoped LORALOOP_API_KEYS), the servicer's `ConcurrencyLimit` (shared by both
protocols), `ServerMetrics.call` (counted and access-logged with protocol="http"), and
the INTERNAL answer to a servicer bug. So the engine, bandit, event log, request-id HMAC
and every validation and limit are the gRPC path's own.

The end user's id comes from the body's `safety_identifier` or `user`, or the
x-loraloop-user header. Responses carry our request id as `id` (pass it to /v1/feedback),
and `adapter_version` and `arm` beside OpenAI's fields; the headers x-loraloop-request-id,
x-loraloop-adapter-version and x-loraloop-arm say the same (for a stream, they come with
its first token, from the servicer's gRPC initial metadata).
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import math
import socket
import ssl
import time
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Iterator
from typing import TYPE_CHECKING, Any, NoReturn, Protocol, TypeVar, cast

import grpc
import uvicorn
from google.protobuf import json_format
from grpc_health.v1 import health_pb2
from starlette.applications import Starlette
from starlette.background import BackgroundTask
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from loraloop.core.gen.loraloop.v1 import api_pb2
from loraloop.core.settings import Settings, StartupError
from loraloop.service import openai_schema as oa
from loraloop.service.auth import AuthInterceptor, Denial, presented_key
from loraloop.service.call_guard import failure_message
from loraloop.service.call_metadata import read_response_metadata, response_metadata
from loraloop.service.metrics import ServerMetrics
from loraloop.service.validation import RequestError

if TYPE_CHECKING:
    from loraloop.service.server import LoraLoopService

log = logging.getLogger(__name__)

SERVICE_NAME = api_pb2.DESCRIPTOR.services_by_name["LoraLoop"].full_name
HTTP_SERVICE = "loraloop.http"  # metrics label of the routes no servicer method answers
MISSING_KEY: Denial = (
    grpc.StatusCode.UNAUTHENTICATED,
    "no API key: send one as 'Authorization: Bearer <key>' (the openai client's api_key)",
)
UNKNOWN_KEY: Denial = (
    grpc.StatusCode.UNAUTHENTICATED,
    "the API key in 'Authorization: Bearer' is not valid: check it, or ask the operator for "
    "one (keys are listed in the server's LORALOOP_API_KEYS)",
)
_T = TypeVar("_T")


class HealthCheck(Protocol):
    """The gRPC server's health servicer (grpc_health's sync or asyncio one): /health asks
    its Check, so both protocols report the same status."""

    def Check(self, request: health_pb2.HealthCheckRequest, context: Any) -> Any: ...


class CallAborted(grpc.aio.AbortError):
    """What `HttpContext.abort` raises: the servicer refused the call with `code`."""

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(details)
        self.code = code
        self.details = details


class ClientGone(Exception):
    """The HTTP client disconnected before the answer was ready (its work is cancelled)."""


class HttpContext(grpc.aio.ServicerContext):
    """The servicer's view of an HTTP call, standing in for grpc's ServicerContext."""

    def __init__(self, request: Request) -> None:
        self._request = request
        self._code: grpc.StatusCode | None = None
        self._details = ""
        self.initial_metadata: tuple[tuple[str, str], ...] = ()
        self._trailing: tuple[tuple[str, str], ...] = ()
        self._callbacks: list[Callable[[Any], None]] = []
        self._done = False
        self._cancelled = False

    async def abort(
        self, code: grpc.StatusCode, details: str = "", trailing_metadata: Any = ()
    ) -> NoReturn:
        self._code, self._details = code, details
        raise CallAborted(code, details)

    async def abort_with_status(self, status: Any) -> NoReturn:
        await self.abort(status.code, status.details)

    def set_code(self, code: grpc.StatusCode) -> None:
        self._code = code

    def set_details(self, details: str) -> None:
        self._details = details

    def code(self) -> grpc.StatusCode | None:
        return self._code

    def details(self) -> str:
        return self._details

    def invocation_metadata(self) -> tuple[tuple[str, str], ...]:
        return tuple(self._request.headers.items())

    def peer(self) -> str:
        client = self._request.client
        if client is None:
            return ""
        return (
            f"ipv6:[{client.host}]:{client.port}"
            if ":" in client.host
            else (f"ipv4:{client.host}:{client.port}")
        )

    def peer_identities(self) -> None:
        return None

    def peer_identity_key(self) -> None:
        return None

    def auth_context(self) -> dict[str, Any]:
        return {}

    def time_remaining(self) -> float | None:
        return None

    def cancelled(self) -> bool:
        return self._cancelled

    def done(self) -> bool:
        return self._done

    def add_done_callback(self, callback: Callable[[Any], None]) -> None:
        self._callbacks.append(callback)

    async def send_initial_metadata(self, initial_metadata: Any) -> None:
        self.initial_metadata = tuple(initial_metadata)

    def set_trailing_metadata(self, trailing_metadata: Any) -> None:
        self._trailing = tuple(trailing_metadata)

    def trailing_metadata(self) -> tuple[tuple[str, str], ...]:
        return self._trailing

    def set_compression(self, compression: Any) -> None:
        pass

    def disable_next_message_compression(self) -> None:
        pass

    async def read(self) -> NoReturn:
        raise RuntimeError("an HTTP call has no request stream")

    async def write(self, message: Any) -> NoReturn:
        raise RuntimeError("the HTTP API writes a servicer's responses itself")

    def finish(self, cancelled: bool) -> None:
        self._done, self._cancelled = True, cancelled
        for callback in self._callbacks:
            callback(self)


def _error_response(err: oa.ApiError) -> JSONResponse:
    return JSONResponse(err.body(), status_code=err.status, headers=err.headers)


async def _disconnected(request: Request) -> None:
    """Returns when the client has gone (the body is read: only a disconnect comes)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def _until_disconnect(request: Request, work: Awaitable[_T]) -> _T:
    """`work`'s result; cancels it if the client disconnects first (as gRPC cancels a call
    whose client went away), raising ClientGone once it has unwound."""
    task = asyncio.ensure_future(work)
    gone = asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait((task, gone), return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
        if not task.done():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
    if task.cancelled():
        raise ClientGone
    return task.result()


class OpenAiApi:
    """The Starlette app of the HTTP API over one `LoraLoopService`."""

    def __init__(
        self,
        service: LoraLoopService,
        health_servicer: HealthCheck,
        metrics: ServerMetrics,
        auth: AuthInterceptor | None,
        max_body_bytes: int,
    ) -> None:
        self.service = service
        self.health = health_servicer
        self.metrics = metrics
        self.auth = auth
        self.max_body_bytes = max_body_bytes
        self.created = int(time.time())
        self.app = Starlette(
            routes=[
                Route("/v1/chat/completions", self.chat_completions, methods=["POST"]),
                Route("/v1/completions", self.completions, methods=["POST"]),
                Route("/v1/models", self.models, methods=["GET"]),
                Route("/v1/feedback", self.feedback, methods=["POST"]),
                Route("/health", self.healthcheck, methods=["GET"]),
            ],
            exception_handlers={HTTPException: self._http_error},
        )

    @property
    def model_id(self) -> str:
        return self.service.engine.model_id

    # --- shared steps ---------------------------------------------------------------------
    async def _http_error(self, request: Request, exc: Exception) -> Response:
        """Starlette's own refusals (no such route, wrong method) in OpenAI's shape."""
        status = exc.status_code if isinstance(exc, HTTPException) else 500
        where = f"{request.method} {request.url.path}"
        message = (
            f"{where} is not a route of this server: use /v1/chat/completions, "
            "/v1/completions, /v1/models, /v1/feedback or /health"
            if status == 404
            else f"{where}: {getattr(exc, 'detail', 'refused')}"
        )
        code = {404: "not_found", 405: "method_not_allowed"}.get(status)
        return _error_response(oa.ApiError(status, message, code=code))

    async def _body(self, request: Request) -> dict[str, Any]:
        """The JSON object of the body, read up to max_body_bytes (LORALOOP_MAX_MESSAGE_BYTES,
        gRPC's bound on a request): a longer body is refused with 413 before it is read."""
        limit = self.max_body_bytes
        too_large = oa.ApiError(
            413,
            f"the request body is over {limit} bytes (the server's max_message_bytes): "
            "send a shorter prompt",
            code="request_too_large",
            grpc_code=grpc.StatusCode.RESOURCE_EXHAUSTED,
        )
        length = request.headers.get("content-length", "")
        if length.isdigit() and int(length) > limit:
            raise too_large
        data = bytearray()
        async for chunk in request.stream():
            data += chunk
            if len(data) > limit:
                raise too_large
        return oa.json_object(bytes(data))

    def _authorize(self, rpc: str, request: Request, user_id: str | None) -> None:
        """The gRPC AuthInterceptor's check, with the bearer key; `user_id` None: only that
        the key is known (before the body is read, or for a route of no user)."""
        if self.auth is None:
            return
        key = _bearer(request)
        denial = self.auth.check(
            rpc, key, user_id, any_key=user_id is None, missing=MISSING_KEY, unknown=UNKNOWN_KEY
        )
        if denial is not None:
            raise oa.from_status(*denial)

    # --- generation -----------------------------------------------------------------------
    async def chat_completions(self, request: Request) -> Response:
        return await self._generate(request, oa.parse_chat, oa.chat_completion, chat=True)

    async def completions(self, request: Request) -> Response:
        return await self._generate(request, oa.parse_completion, oa.text_completion, chat=False)

    async def _generate(
        self,
        request: Request,
        parse: oa.Parser,
        render: Callable[[api_pb2.GenerateResponse, str], dict[str, Any]],
        chat: bool,
    ) -> Response:
        ctx = HttpContext(request)
        parsed: oa.Generation | None = None
        refused: oa.ApiError | None = None
        try:
            parsed = parse(await self._body(request), request.headers.get(oa.USER_HEADER))
        except oa.ApiError as err:
            refused = err
        method = "GenerateStream" if parsed is not None and parsed.stream else "Generate"
        proto = parsed.request if parsed is not None else None
        call = self.metrics.call("http", SERVICE_NAME, method, proto, ctx)
        call.log_fields.update(route=request.url.path)
        call.__enter__()
        admitted = handed_over = False
        exc_type: type[BaseException] | None = None
        try:
            self._authorize(method, request, None)
            if refused is not None:
                raise refused
            assert parsed is not None
            if parsed.model != self.model_id:
                raise oa.model_not_found(parsed.model)
            self._authorize(method, request, parsed.request.user_id)
            try:
                self.service.limit.enter()  # the limit gRPC's CallGuard admits through
            except RequestError as err:
                raise oa.from_status(err.code, err.message) from None
            admitted = True
            if parsed.stream:
                response = await self._stream(request, parsed, ctx, call, chat)
                handed_over = True
                return response
            result = await _until_disconnect(request, self.service.Generate(parsed.request, ctx))
            call.saw(result)
            ids = response_metadata(result.request_id, result.adapter_version, result.arm)
            return self._done(call, JSONResponse(render(result, self.model_id), headers=dict(ids)))
        except CallAborted as err:
            names = parsed.names if parsed is not None else None
            return self._done(call, _error_response(oa.from_status(err.code, err.details, names)))
        except oa.ApiError as err:
            ctx.set_code(err.grpc_code)
            return self._done(call, _error_response(err))
        except ClientGone:
            ctx.set_code(grpc.StatusCode.CANCELLED)
            exc_type = asyncio.CancelledError
            return self._done(call, Response(status_code=499))
        except asyncio.CancelledError:
            exc_type = asyncio.CancelledError
            raise
        except Exception as exc:
            ctx.set_code(grpc.StatusCode.INTERNAL)
            message = failure_message(f"/{SERVICE_NAME}/{method}", exc)
            return self._done(
                call, _error_response(oa.from_status(grpc.StatusCode.INTERNAL, message))
            )
        finally:
            if not handed_over:
                if admitted:
                    self.service.limit.leave()
                ctx.finish(cancelled=exc_type is not None)
                call.__exit__(exc_type, None, None)

    @staticmethod
    def _done(call: Any, response: Response) -> Response:
        call.log_fields["status"] = response.status_code
        return response

    async def _stream(
        self, request: Request, parsed: oa.Generation, ctx: HttpContext, call: Any, chat: bool
    ) -> Response:
        """Waits for the servicer's first message (a refusal before it is still an HTTP
        error status), then streams; the stream's end releases the call."""
        stream = cast(
            AsyncGenerator[api_pb2.GenerateStreamResponse, None],
            self.service.GenerateStream(parsed.request, ctx),
        )
        first: api_pb2.GenerateStreamResponse = await _until_disconnect(request, stream.__anext__())
        ids = read_response_metadata(ctx.initial_metadata)
        if ids is None and first.HasField("final"):
            ids = (first.final.request_id, first.final.adapter_version, first.final.arm)
        request_id, version, arm = ids or ("", 0, "")
        chunks = oa.Chunks(chat, self.model_id, request_id, version, arm)
        finished = False

        async def finish(exc_type: type[BaseException] | None) -> None:
            nonlocal finished
            if finished:
                return
            finished = True
            try:
                await stream.aclose()
            finally:
                self.service.limit.leave()
                ctx.finish(cancelled=exc_type is not None)
                call.__exit__(exc_type, None, None)

        async def events() -> AsyncIterator[bytes]:
            exc_type: type[BaseException] | None = None
            try:
                if (opening := chunks.first()) is not None:
                    yield oa.sse(opening)
                item = first
                while not item.HasField("final"):
                    if item.delta:
                        yield oa.sse(chunks.text(item.delta))
                    item = await stream.__anext__()
                final = item.final
                call.saw(item)
                chunks.request_id, chunks.adapter_version, chunks.arm = (
                    final.request_id,
                    final.adapter_version,
                    final.arm,
                )
                yield oa.sse(chunks.last(final))
                if parsed.include_usage:
                    yield oa.sse(chunks.usage(final))
                yield oa.DONE
            except CallAborted as err:  # after the first token: the status is sent already
                yield oa.sse(oa.from_status(err.code, err.details).body())
                yield oa.DONE
            except Exception as exc:
                ctx.set_code(grpc.StatusCode.INTERNAL)
                message = failure_message(f"/{SERVICE_NAME}/GenerateStream", exc)
                yield oa.sse(oa.from_status(grpc.StatusCode.INTERNAL, message).body())
                yield oa.DONE
            except BaseException as exc:  # cancelled: the client went away
                exc_type = type(exc)
                raise
            finally:
                call.log_fields["status"] = 200
                await finish(exc_type)

        headers = dict(response_metadata(request_id, version, arm)) if ids else {}
        headers["cache-control"] = "no-cache"
        return StreamingResponse(
            events(),
            media_type="text/event-stream",
            headers=headers,
            # runs after the body, or instead of its end when the client left mid-stream
            background=BackgroundTask(finish, asyncio.CancelledError),
        )

    # --- the other routes -----------------------------------------------------------------
    async def feedback(self, request: Request) -> Response:
        ctx = HttpContext(request)
        names: dict[str, str] | None = None
        feedback: api_pb2.FeedbackRequest | None = None
        refused: oa.ApiError | None = None
        try:
            feedback, names = oa.parse_feedback(
                await self._body(request), request.headers.get(oa.USER_HEADER)
            )
        except oa.ApiError as err:
            refused = err
        with self.metrics.call("http", SERVICE_NAME, "Feedback", feedback, ctx) as call:
            call.log_fields.update(route=request.url.path)
            try:
                self._authorize("Feedback", request, None)
                if refused is not None:
                    raise refused
                assert feedback is not None
                self._authorize("Feedback", request, feedback.user_id)
                answer = await self.service.Feedback(feedback, ctx)
                body = _proto_json(answer)
                return self._done(call, JSONResponse(body))
            except CallAborted as err:
                return self._done(
                    call, _error_response(oa.from_status(err.code, err.details, names))
                )
            except oa.ApiError as err:
                ctx.set_code(err.grpc_code)
                return self._done(call, _error_response(err))
            except Exception as exc:
                ctx.set_code(grpc.StatusCode.INTERNAL)
                message = failure_message(f"/{SERVICE_NAME}/Feedback", exc)
                return self._done(
                    call, _error_response(oa.from_status(grpc.StatusCode.INTERNAL, message))
                )

    async def models(self, request: Request) -> Response:
        ctx = HttpContext(request)
        with self.metrics.call("http", HTTP_SERVICE, "Models", None, ctx) as call:
            call.log_fields.update(route=request.url.path)
            try:
                self._authorize("Models", request, None)
            except oa.ApiError as err:
                ctx.set_code(err.grpc_code)
                return self._done(call, _error_response(err))
            return self._done(call, JSONResponse(oa.models_list(self.model_id, self.created)))

    async def healthcheck(self, request: Request) -> Response:
        """The gRPC health service's own answer (no key needed, as over gRPC)."""
        ctx = HttpContext(request)
        service = request.query_params.get("service", "")
        try:
            answer = self.health.Check(health_pb2.HealthCheckRequest(service=service), ctx)
            if inspect.isawaitable(answer):  # grpc_health's aio servicer
                answer = await answer
        except CallAborted:  # the aio servicer aborts NOT_FOUND; the sync one sets the code
            pass
        if ctx.code() == grpc.StatusCode.NOT_FOUND:
            err = oa.ApiError(404, f"no health status for service {service[:100]!r}")
            return _error_response(err)
        status = health_pb2.HealthCheckResponse.ServingStatus.Name(answer.status)
        code = 200 if answer.status == health_pb2.HealthCheckResponse.SERVING else 503
        return JSONResponse({"status": status}, status_code=code)


def _bearer(request: Request) -> str | None:
    """The key of `Authorization: Bearer KEY` (or an x-api-key header, as over gRPC)."""
    return presented_key(list(request.headers.items()))


def _proto_json(message: Any) -> dict[str, Any]:
    return json_format.MessageToDict(
        message, preserving_proto_field_name=True, always_print_fields_with_no_presence=True
    )


# --- serving ---------------------------------------------------------------------------------
class _Server(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield  # SIGINT/SIGTERM belong to `loraloop serve`, which stops both front doors


class HttpPortUnavailable(StartupError, RuntimeError):
    """The HTTP API's address cannot be listened on (a start-up refusal)."""


def bind_http(settings: Settings) -> socket.socket:
    """A listening socket on host:http_port (0: a free port), bound before the model loads
    so a taken port stops start-up at once, with a message naming the setting."""
    host, port = settings.host, settings.http_port
    try:
        family, kind, proto, _, address = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0]
        sock = socket.socket(family, kind, proto)
    except OSError as exc:
        raise HttpPortUnavailable(f"HTTP API on {host}:{port}: {exc}") from exc
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(2048)
        sock.setblocking(False)
    except OSError as exc:
        sock.close()
        raise HttpPortUnavailable(
            f"cannot listen on {host}:{port} for the HTTP API ({exc.strerror or exc}): free "
            "the port or set LORALOOP_HTTP_PORT to another one (0: any free port, -1: off)"
        ) from exc
    return sock


class HttpFrontDoor:
    """The HTTP API served by uvicorn as a task of the gRPC server's own event loop."""

    def __init__(self, api: OpenAiApi, server: uvicorn.Server, sock: socket.socket) -> None:
        self.api = api
        self._server = server
        self._sock = sock
        self.host, self.port = sock.getsockname()[:2]
        self.scheme = "https" if server.config.is_ssl else "http"
        self._task: asyncio.Task[None] | None = None

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.scheme}://{host}:{self.port}"

    @classmethod
    async def start(cls, settings: Settings, api: OpenAiApi, sock: socket.socket) -> HttpFrontDoor:
        """Serve on `sock` (from `bind_http`), with the gRPC server's TLS files."""
        client_ca = settings.tls_client_ca_file
        config = uvicorn.Config(
            api.app,
            http="h11",  # the pinned parser (uvicorn's "auto" would take httptools if present)
            lifespan="off",
            log_config=None,
            access_log=False,  # ServerMetrics.call writes the access log, as for gRPC
            server_header=False,
            ws="none",
            timeout_graceful_shutdown=max(1, math.ceil(settings.grace_seconds)),
            ssl_certfile=str(settings.tls_cert_file) if settings.tls_cert_file else None,
            ssl_keyfile=str(settings.tls_key_file) if settings.tls_key_file else None,
            ssl_ca_certs=str(client_ca) if client_ca else None,
            ssl_cert_reqs=ssl.CERT_REQUIRED if client_ca else ssl.CERT_NONE,
        )
        door = cls(api, _Server(config), sock)
        door._task = asyncio.create_task(door._server.serve(sockets=[sock]))
        while not door._server.started:
            if door._task.done():
                door._task.result()  # raises what stopped it
                raise RuntimeError("the HTTP server stopped during start-up")
            await asyncio.sleep(0.01)
        return door

    def begin_stop(self, grace: float) -> asyncio.Task[None]:
        """Stop accepting, let calls in flight finish for up to `grace` seconds (then they
        are cancelled); the task ends when the server has. Runs beside gRPC's drain."""
        assert self._task is not None
        self._server.config.timeout_graceful_shutdown = max(grace, 0.1)  # type: ignore[assignment]
        self._server.should_exit = True
        return self._task


async def start_http(
    settings: Settings,
    service: LoraLoopService,
    health_servicer: HealthCheck,
    metrics: ServerMetrics,
    auth: AuthInterceptor | None,
    sock: socket.socket,
) -> HttpFrontDoor:
    api = OpenAiApi(service, health_servicer, metrics, auth, settings.max_message_bytes)
    return await HttpFrontDoor.start(settings, api, sock)
