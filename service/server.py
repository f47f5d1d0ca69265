"""The gRPC server: Generate/GenerateStream/Feedback/GetUserState/DeleteUser,
standard health and reflection, graceful shutdown."""

from __future__ import annotations

import asyncio
import logging
import signal
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from loraloop.core.adapters.store import AdapterStore, AdapterStoreError
from loraloop.core.adapters.version import AdapterVersion
from loraloop.core.bandits.features import context_features
from loraloop.core.gen.loraloop.v1 import api_pb2, api_pb2_grpc, common_pb2, events_pb2
from loraloop.core.metrics_exporter import start_metrics_exporter
from loraloop.core.settings import Settings
from loraloop.service.adapters import fallback
from loraloop.service.adapters.registry import AdapterRegistry
from loraloop.service.admission import ConcurrencyLimit
from loraloop.service.auth import AuthInterceptor, build_interceptor
from loraloop.service.call_guard import CallGuard
from loraloop.service.engines.factory import build_engine
from loraloop.service.engines.protocol import AdapterLoadError, Engine, GenerationRequest
from loraloop.service.event_log import EventLog
from loraloop.service.metrics import ServerMetrics
from loraloop.service.request_ids import RequestIds
from loraloop.service.strategy import Choice, StrategyChooser
from loraloop.service.tls import describe as describe_tls
from loraloop.service.tls import server_credentials
from loraloop.service.validation import (
    RequestError,
    check_arm,
    check_input,
    check_sampling,
    check_signals,
    check_user,
    invalid,
)

log = logging.getLogger(__name__)
SERVICE_NAME = api_pb2.DESCRIPTOR.services_by_name["LoraLoop"].full_name


@dataclass
class Prepared:
    """A validated Generate request: what the engine runs and what the event logs."""

    gen: GenerationRequest
    choice: Choice
    context: list[float]
    prompt_text: str
    # When the request came in: its Interaction is stamped with it, so a generation that
    # runs across a DeleteUser of its user is seen as predating the deletion.
    started_ms: int


def _now_ms() -> int:
    return int(time.time() * 1000)


class LoraLoopService(api_pb2_grpc.LoraLoopServicer):
    def __init__(
        self,
        settings: Settings,
        engine: Engine,
        registry: AdapterRegistry,
        events: EventLog,
        store: AdapterStore,
        strategy: StrategyChooser,
    ) -> None:
        self.settings = settings
        self.engine = engine
        self.registry = registry
        self.events = events
        self.store = store
        self.strategy = strategy
        # Generate/GenerateStream in flight; admitted by the CallGuard interceptor
        self.limit = ConcurrencyLimit(settings.max_concurrent_requests)
        self.request_ids = RequestIds(settings.request_id_secret.get_secret_value())

    # --- Generate -----------------------------------------------------------------------
    async def _resolve(self, user_id: str) -> AdapterVersion | None:
        """The registry's version for the user; its first lookup of a user lists the store,
        which happens in a worker thread, off the event loop."""
        if self.registry.known(user_id):
            return self.registry.resolve(user_id)
        return await asyncio.to_thread(self.registry.resolve, user_id)

    async def _prepare(self, request: api_pb2.GenerateRequest) -> Prepared:
        started_ms = _now_ms()
        user_id = check_user(request.user_id)
        prompt, messages = check_input(request, self.settings.max_prompt_chars)
        pinned = check_arm(request.arm)
        decoding = check_sampling(request.sampling, self.settings)
        is_chat = messages is not None
        token_ids = self.engine.encode(prompt, messages)
        context = context_features(len(token_ids), is_chat)
        choice = self.strategy.choose(user_id, context, pinned=pinned)
        arm = choice.arm
        # The arm's system prompt goes in front of chat requests that bring none themselves.
        if messages is not None and arm.system_prompt and all(r != "system" for r, _ in messages):
            messages = [("system", arm.system_prompt), *messages]
            token_ids = self.engine.encode(prompt, messages)
        sampling = request.sampling
        temperature = decoding.temperature
        if arm.temperature is not None and not sampling.HasField("temperature"):
            temperature = arm.temperature
        top_p = decoding.top_p
        if arm.top_p is not None and not sampling.HasField("top_p"):
            top_p = arm.top_p
        if len(token_ids) > self.settings.max_prompt_tokens:
            raise RequestError(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"prompt is {len(token_ids)} tokens: the limit is "
                f"{self.settings.max_prompt_tokens}; shorten it",
            )
        if not token_ids:
            raise invalid("prompt encodes to no tokens: send some text")
        gen = GenerationRequest(
            request_id=self.request_ids.issue(user_id),
            prompt_token_ids=token_ids,
            adapter=await self._resolve(user_id),
            max_tokens=decoding.max_tokens,
            temperature=temperature,
            top_p=top_p,
            seed=decoding.seed,
        )
        text = (prompt or "") if messages is None else "\n".join(f"{r}: {c}" for r, c in messages)
        return Prepared(gen, choice, [float(v) for v in context], text, started_ms)

    def _response(
        self,
        request: api_pb2.GenerateRequest,
        prepared: Prepared,
        text: str,
        token_ids: list[int],
        logprobs: list[float],
    ) -> api_pb2.GenerateResponse:
        gen = prepared.gen
        version = gen.adapter.version if gen.adapter else 0
        finish = self.engine.finish_reason(token_ids, gen.max_tokens)
        event = events_pb2.Interaction(
            request_id=gen.request_id,
            user_id=request.user_id,
            timestamp_ms=prepared.started_ms,
            prompt=prepared.prompt_text,
            prompt_token_ids=gen.prompt_token_ids,
            response_token_ids=token_ids,
            behaviour_logprobs=logprobs,
            response_text=text,
            adapter_version=version,
            arm=prepared.choice.arm.name,
            arm_propensity=prepared.choice.propensity,
            sampling=common_pb2.SamplingParams(
                max_tokens=gen.max_tokens,
                temperature=gen.temperature,
                top_p=gen.top_p,
                **({"seed": gen.seed} if gen.seed is not None else {}),
            ),
            model_id=self.engine.model_id,
            finish_reason=finish,
            context=prepared.context,
        )
        self.events.publish(
            self.settings.topic_interactions, request.user_id, event.SerializeToString()
        )
        return api_pb2.GenerateResponse(
            request_id=gen.request_id,
            text=text,
            adapter_version=version,
            arm=prepared.choice.arm.name,
            usage=api_pb2.Usage(
                prompt_tokens=len(gen.prompt_token_ids), completion_tokens=len(token_ids)
            ),
            finish_reason=finish,
        )

    async def Generate(
        self, request: api_pb2.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> api_pb2.GenerateResponse:
        try:
            prepared = await self._prepare(request)
            result = await fallback.generate(self.engine, self.registry, prepared.gen)
        except RequestError as err:
            await context.abort(err.code, err.message)
        except AdapterLoadError as err:
            await context.abort(grpc.StatusCode.UNAVAILABLE, str(err))
        return self._response(request, prepared, result.text, result.token_ids, result.logprobs)

    async def GenerateStream(
        self, request: api_pb2.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[api_pb2.GenerateStreamResponse]:
        try:
            prepared = await self._prepare(request)
        except RequestError as err:
            await context.abort(err.code, err.message)
        token_ids: list[int] = []
        logprobs: list[float] = []
        text = ""
        try:
            async for chunk in fallback.stream(self.engine, self.registry, prepared.gen):
                token_ids += chunk.token_ids
                logprobs += chunk.logprobs
                text += chunk.text
                if chunk.text:
                    yield api_pb2.GenerateStreamResponse(delta=chunk.text)
        except AdapterLoadError as err:
            await context.abort(grpc.StatusCode.UNAVAILABLE, str(err))
        final = self._response(request, prepared, text, token_ids, logprobs)
        yield api_pb2.GenerateStreamResponse(final=final)

    # --- Feedback -----------------------------------------------------------------------
    async def Feedback(
        self, request: api_pb2.FeedbackRequest, context: grpc.aio.ServicerContext
    ) -> api_pb2.FeedbackResponse:
        try:
            user_id = check_user(request.user_id)
            if not self.request_ids.well_formed(request.request_id):
                raise RequestError(
                    grpc.StatusCode.NOT_FOUND,
                    f"request_id {request.request_id[:64]!r} is unknown: pass the request_id"
                    " that Generate returned",
                )
            if not self.request_ids.belongs_to(request.request_id, user_id):
                raise RequestError(
                    grpc.StatusCode.PERMISSION_DENIED,
                    "request_id was not issued to this user_id: feedback must come from the"
                    " user the response was served to",
                )
            check_signals(request.signals)
        except RequestError as err:
            await context.abort(err.code, err.message)
        event = events_pb2.FeedbackEvent(
            request_id=request.request_id,
            user_id=user_id,
            timestamp_ms=_now_ms(),
            signals=request.signals,
        )
        accepted = self.events.publish(
            self.settings.topic_feedback, user_id, event.SerializeToString()
        )
        if not accepted:
            await context.abort(
                grpc.StatusCode.RESOURCE_EXHAUSTED, "event queue is full: retry with backoff"
            )
        return api_pb2.FeedbackResponse(accepted=True)

    # --- user state ---------------------------------------------------------------------
    async def GetUserState(
        self, request: api_pb2.GetUserStateRequest, context: grpc.aio.ServicerContext
    ) -> api_pb2.UserState:
        try:
            user_id = check_user(request.user_id)
        except RequestError as err:
            await context.abort(err.code, err.message)
        ref = await self._resolve(user_id)
        state = await asyncio.to_thread(self._learner_state, ref) if ref else {}
        return api_pb2.UserState(
            user_id=user_id,
            adapter_version=ref.version if ref else 0,
            updates=int(state.get("updates", 0)),
            recent_reward=float(state.get("baseline", 0.0)),
            arms=[
                api_pb2.ArmStats(arm=a, pulls=n, mean_reward=m)
                for a, n, m in self.strategy.arm_stats(user_id)
            ],
        )

    def _learner_state(self, ref: AdapterVersion) -> dict[str, Any]:
        """The learner state of `ref`, or of the newest older version whose state reads
        when it is unreadable (logged), or {} (zeros) when none does."""
        try:
            versions = [v for v in self.store.versions(ref.user_id) if v <= ref.version]
        except OSError as exc:
            log.warning("learner state of %s: store not listable (%s)", ref.user_id, exc)
            return {}
        for version in reversed(versions or [ref.version]):
            try:
                return self.store.learner_state(ref.user_id, version)
            except AdapterStoreError as exc:
                log.warning("learner state skipped, trying an older version: %s", exc)
        return {}

    async def DeleteUser(
        self, request: api_pb2.DeleteUserRequest, context: grpc.aio.ServicerContext
    ) -> api_pb2.DeleteUserResponse:
        try:
            user_id = check_user(request.user_id)
        except RequestError as err:
            await context.abort(err.code, err.message)
        # Forget here at once (registry, engine slots and host cache, bandit state); the
        # tombstones tell every replica and the learner (which owns the store) to forget.
        # The registry forgets on the loop (a Generate resolving after this line gets the
        # base model); the rest (the registry's on_delete hook) waits for the engine's slot
        # lock, so it runs in a thread.
        self.registry.forget(user_id)
        await asyncio.to_thread(self.registry.release, user_id)
        s = self.settings
        deleted_ms = int(time.time() * 1000)  # not the send time, hours later after an outage
        queued = all(
            self.events.publish(topic, user_id, None, timestamp_ms=deleted_ms)
            for topic in (s.topic_adapter_updates, s.topic_bandit_state)
        )
        if not queued:
            await context.abort(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                "event queue is full, the deletion was not recorded: retry with backoff",
            )
        return api_pb2.DeleteUserResponse(deleted=True)


@dataclass
class RunningServer:
    server: grpc.aio.Server
    port: int
    service: LoraLoopService
    health: health.HealthServicer
    metrics: ServerMetrics | None = None
    auth: AuthInterceptor | None = None

    async def stop(self, grace: float | None = None) -> None:
        """Report NOT_SERVING, drain in-flight calls for `grace` seconds, flush events."""
        svc = self.service
        for name in ("", SERVICE_NAME):
            self.health.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
        await self.server.stop(svc.settings.grace_seconds if grace is None else grace)
        await svc.engine.stop()
        svc.registry.stop()
        svc.strategy.stop()
        await asyncio.to_thread(svc.events.stop)


async def create_server(settings: Settings, engine: Engine | None = None) -> RunningServer:
    """Start the engine, Kafka follower and event log, then serve on settings.host:port."""
    # Security settings first: a misconfiguration fails before the model loads.
    auth = build_interceptor(
        settings.api_keys.get_secret_value(), settings.auth_required, SERVICE_NAME
    )
    credentials = server_credentials(settings)
    engine = engine or build_engine(settings)
    await engine.start()
    store = AdapterStore(settings.adapter_store)
    strategy = StrategyChooser(settings)
    metrics = ServerMetrics()

    def forget_user(user_id: str) -> None:
        """A tombstone (ours or another replica's): drop what this process holds of the user."""
        engine.drop_user(user_id)
        strategy.forget(user_id)
        metrics.forget_user(user_id)

    registry = AdapterRegistry(
        store, settings.kafka_bootstrap, settings.topic_adapter_updates, forget_user
    )
    registry.start()
    events = EventLog.from_settings(settings)
    events.start()
    strategy.start()
    service = LoraLoopService(settings, engine, registry, events, store, strategy)
    metrics.watch(
        engine=engine,
        registry=registry,
        events=events,
        adapter_slots=settings.adapter_slots,
        queue_size=settings.event_queue_size,
    )
    interceptors: list[grpc.aio.ServerInterceptor] = [metrics.interceptor]
    if auth is not None:
        interceptors.append(auth)  # inside metrics: refused calls are counted with their code
    # innermost: it sees the servicer's exceptions, metrics and auth see its answers
    interceptors.append(CallGuard(SERVICE_NAME, service.limit, ("Generate", "GenerateStream")))
    server = grpc.aio.server(
        interceptors=interceptors,
        options=[("grpc.max_receive_message_length", settings.max_message_bytes)],
    )
    api_pb2_grpc.add_LoraLoopServicer_to_server(service, server)
    health_servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        (SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), server
    )
    address = f"{settings.host}:{settings.port}"
    port = (
        server.add_secure_port(address, credentials)
        if credentials is not None
        else server.add_insecure_port(address)
    )
    await server.start()
    if auth is not None and credentials is None:
        log.warning(
            "API keys are required but TLS is off: keys cross the network in plaintext. Set "
            "LORALOOP_TLS_CERT_FILE and LORALOOP_TLS_KEY_FILE (helm: tls.enabled), or make "
            "sure a mesh or proxy in front of the server encrypts the traffic"
        )
    for name in ("", SERVICE_NAME):
        health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    log.info(
        "serving %s on %s:%d (%s, API keys %s)",
        engine.model_id,
        settings.host,
        port,
        describe_tls(settings),
        "required" if auth is not None else "off",
    )
    return RunningServer(server, port, service, health_servicer, metrics, auth)


async def serve(settings: Settings) -> None:
    """Run until SIGINT/SIGTERM, then shut down gracefully."""
    running = await create_server(settings)
    exporter = None
    if settings.server_metrics_port >= 0 and running.metrics is not None:
        exporter = start_metrics_exporter(
            running.metrics.registry, settings.metrics_host, settings.server_metrics_port
        )
        print(f"loraloop server metrics on {exporter.host}:{exporter.port}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):  # before the ready line, which invites them
        loop.add_signal_handler(sig, stop.set)
    print(f"loraloop server listening on {settings.host}:{running.port}", flush=True)
    await stop.wait()
    await running.stop()
    if exporter is not None:
        exporter.stop()
