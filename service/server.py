"""The gRPC server: Generate/GenerateStream/Feedback/GetUserState/DeleteUser,
standard health and reflection, graceful shutdown."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import signal
import statistics
import time
from collections import OrderedDict
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from loraloop.core.adapters.opening import open_adapter_store
from loraloop.core.adapters.protocol import VersionStore
from loraloop.core.adapters.store import AdapterStoreError
from loraloop.core.adapters.version import AdapterVersion
from loraloop.core.bandits.context_schema import load_context_schema
from loraloop.core.gen.loraloop.v1 import api_pb2, api_pb2_grpc, common_pb2, events_pb2
from loraloop.core.metrics_exporter import start_metrics_exporter
from loraloop.core.settings import Settings
from loraloop.service.adapters import fallback
from loraloop.service.adapters.registry import AdapterRegistry
from loraloop.service.admission import ConcurrencyLimit
from loraloop.service.auth import AuthInterceptor, build_interceptor
from loraloop.service.call_guard import CallGuard
from loraloop.service.call_metadata import response_metadata
from loraloop.service.engines.factory import build_engine
from loraloop.service.engines.protocol import AdapterLoadError, Engine, GenerationRequest
from loraloop.service.event_log import EventLog
from loraloop.service.health import HealthService
from loraloop.service.metrics import ServerMetrics
from loraloop.service.openai_api import HttpFrontDoor, bind_http, start_http
from loraloop.service.request_ids import Ownership, RequestIds
from loraloop.service.strategy import Choice, StrategyChooser
from loraloop.service.tls import describe as describe_tls
from loraloop.service.tls import server_credentials
from loraloop.service.validation import (
    RequestError,
    check_adapter_floor,
    check_arm,
    check_context,
    check_input,
    check_regenerates,
    check_sampling,
    check_signals,
    check_user,
    invalid,
    shown,
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
    # A place in the event queue is held for the interaction until it is published (or
    # the call fails): a response is never answered with its interaction dropped.
    holds_place: bool = False
    # GenerateRequest.regenerates, checked: the request id this response replaces ("": none)
    regenerates: str = ""


def _now_ms() -> int:
    return int(time.time() * 1000)


class LoraLoopService(api_pb2_grpc.LoraLoopServicer):
    def __init__(
        self,
        settings: Settings,
        engine: Engine,
        registry: AdapterRegistry,
        events: EventLog,
        store: VersionStore,
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
        # request id -> its issue time (ms), for ids whose feedback was accepted here
        # ("earliest": a repeat is answered accepted=false); bounded, see _remember_feedback
        self._rated: OrderedDict[str, int] = OrderedDict()

    # --- Generate -----------------------------------------------------------------------
    async def _resolve(self, user_id: str, floor: int = 0) -> AdapterVersion | None:
        """The registry's version for the user; its first lookup of a user lists the store,
        which happens in a worker thread, off the event loop. `floor`: the newest version
        the client was served (GenerateRequest.min_adapter_version); a view older than it
        is checked against the store (also off the loop)."""
        if self.registry.known(user_id):
            ref = self.registry.resolve(user_id)
            if floor <= (ref.version if ref else 0):
                return ref
        if floor > 0:
            return await asyncio.to_thread(self.registry.catch_up, user_id, floor)
        return await asyncio.to_thread(self.registry.resolve, user_id)

    async def _prepare(self, request: api_pb2.GenerateRequest) -> Prepared:
        """Validate, choose the arm and apply it, hold the interaction's place in the
        event queue. A plain prompt is one user message (GenerateRequest.prompt)."""
        started_ms = _now_ms()
        user_id = check_user(request.user_id)
        prompt, given = check_input(request, self.settings.max_prompt_chars)
        pinned = check_arm(request.arm)
        replaced = check_regenerates(
            request.regenerates, self.request_ids.ownership(request.regenerates, user_id)
        )
        decoding = check_sampling(request.sampling, self.settings)
        numeric, categorical = check_context(request.context, self.strategy.schema)
        messages = given if given is not None else [("user", prompt or "")]
        token_ids = self.engine.encode(None, messages)
        conversation = len(messages) > 1
        context = self.strategy.features(len(token_ids), conversation, numeric, categorical)
        sampling = request.sampling
        set_by_request = frozenset(
            lever
            for lever, is_set in (
                ("system_prompt", any(role == "system" for role, _ in messages)),
                ("temperature", sampling.HasField("temperature")),
                ("top_p", sampling.HasField("top_p")),
            )
            if is_set
        )
        # The arm is applied whole, or not at all (NO_ARM) when the request set one of the
        # arms' levers itself: what is logged and credited is exactly what was applied.
        choice = self.strategy.choose(user_id, context, pinned, set_by_request)
        arm = choice.arm
        if arm.system_prompt:
            messages = [("system", arm.system_prompt), *messages]
            token_ids = self.engine.encode(None, messages)
        temperature = decoding.temperature if arm.temperature is None else arm.temperature
        top_p = decoding.top_p if arm.top_p is None else arm.top_p
        if len(token_ids) > self.settings.max_prompt_tokens:
            raise RequestError(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"prompt is {len(token_ids)} tokens: the limit is "
                f"{self.settings.max_prompt_tokens}; shorten it",
            )
        if not token_ids:
            raise invalid("prompt encodes to no tokens: send some text")
        gen = GenerationRequest(
            request_id=self.request_ids.issue(user_id, started_ms),
            prompt_token_ids=token_ids,
            adapter=await self._resolve(user_id, check_adapter_floor(request.min_adapter_version)),
            max_tokens=decoding.max_tokens,
            temperature=temperature,
            top_p=top_p,
            seed=decoding.seed,
        )
        if not self.events.reserve():
            raise RequestError(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                "event queue is full: the interaction could not be logged, so nothing was "
                "generated; retry with backoff",
            )
        text = "\n".join(f"{r}: {c}" for r, c in messages)
        context_values = [float(v) for v in context]
        return Prepared(gen, choice, context_values, text, started_ms, True, replaced)

    def _give_back_place(self, prepared: Prepared | None) -> None:
        """The call ends without its interaction: hand its place in the queue back."""
        if prepared is not None and prepared.holds_place:
            prepared.holds_place = False
            self.events.unreserve()

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
        choice = prepared.choice
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
            arm=choice.arm.name,  # "" when no arm was applied: credited to none
            arm_propensity=choice.propensity,
            sampling=common_pb2.SamplingParams(
                max_tokens=gen.max_tokens,
                temperature=gen.temperature,
                top_p=gen.top_p,
                **({"seed": gen.seed} if gen.seed is not None else {}),
            ),
            model_id=self.engine.model_id,
            finish_reason=finish,
            context=prepared.context,
            context_schema=self.strategy.schema.fingerprint,
            request_overrides=choice.overrides,
            regenerates=prepared.regenerates,
        )
        reserved, prepared.holds_place = prepared.holds_place, False
        logged = self.events.publish(
            self.settings.topic_interactions,
            request.user_id,
            event.SerializeToString(),
            reserved=reserved,
        )
        if not logged:  # only while the event log stops (its place was held): refuse
            raise RequestError(
                grpc.StatusCode.UNAVAILABLE,
                "the server is stopping and could not log the interaction: retry",
            )
        return api_pb2.GenerateResponse(
            request_id=gen.request_id,
            text=text,
            adapter_version=version,
            arm=choice.arm.name,
            usage=api_pb2.Usage(
                prompt_tokens=len(gen.prompt_token_ids), completion_tokens=len(token_ids)
            ),
            finish_reason=finish,
        )

    async def Generate(
        self, request: api_pb2.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> api_pb2.GenerateResponse:
        prepared: Prepared | None = None
        try:
            try:
                prepared = await self._prepare(request)
                result = await fallback.generate(self.engine, self.registry, prepared.gen)
                response = self._response(
                    request, prepared, result.text, result.token_ids, result.logprobs
                )
            except RequestError as err:
                await context.abort(err.code, err.message)
            except AdapterLoadError as err:
                await context.abort(grpc.StatusCode.UNAVAILABLE, str(err))
        finally:
            self._give_back_place(prepared)  # a failed or cancelled call
        return response

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
            try:
                async for chunk in fallback.stream(self.engine, self.registry, prepared.gen):
                    if chunk.token_ids and not token_ids:  # the version is settled: send the ids
                        gen = prepared.gen
                        version = gen.adapter.version if gen.adapter else 0
                        ids = response_metadata(gen.request_id, version, prepared.choice.arm.name)
                        await context.send_initial_metadata(ids)
                    token_ids += chunk.token_ids
                    logprobs += chunk.logprobs
                    text += chunk.text
                    if chunk.text:
                        yield api_pb2.GenerateStreamResponse(delta=chunk.text)
                final = self._response(request, prepared, text, token_ids, logprobs)
            except AdapterLoadError as err:
                await context.abort(grpc.StatusCode.UNAVAILABLE, str(err))
            except RequestError as err:
                await context.abort(err.code, err.message)
            yield api_pb2.GenerateStreamResponse(final=final)
        finally:
            self._give_back_place(prepared)  # a failed or cancelled stream

    # --- Feedback -----------------------------------------------------------------------
    async def Feedback(
        self, request: api_pb2.FeedbackRequest, context: grpc.aio.ServicerContext
    ) -> api_pb2.FeedbackResponse:
        """OK with accepted=true when the feedback will count, accepted=false (and a
        reason) when it is well formed but will not (FeedbackResponse); NOT_FOUND for an
        id this service did not issue to this user, PERMISSION_DENIED for one it issued
        to another user."""
        try:
            user_id = check_user(request.user_id)
            rid = request.request_id
            owner = self.request_ids.ownership(rid, user_id)
            if owner is Ownership.OTHER_USER:
                raise RequestError(
                    grpc.StatusCode.PERMISSION_DENIED,
                    "request_id was issued to another user_id: feedback must come from the"
                    " user the response was served to",
                )
            if owner is not Ownership.USER:
                raise RequestError(
                    grpc.StatusCode.NOT_FOUND,
                    f"request_id {shown(rid)} was not issued to this user_id: pass the"
                    " request_id that Generate returned for this user",
                )
            check_signals(request.signals, self.settings.preference_max_edit_chars)
        except RequestError as err:
            await context.abort(err.code, err.message)
        now = _now_ms()
        issued = self.request_ids.issued_ms(rid)
        reason = self._not_counted(rid, user_id, issued, now)
        if reason is not None:
            return api_pb2.FeedbackResponse(accepted=False, reason=reason)
        event = events_pb2.FeedbackEvent(
            request_id=rid,
            user_id=user_id,
            timestamp_ms=now,
            signals=request.signals,
            feedback_id=secrets.token_hex(8),
        )
        queued = self.events.publish(
            self.settings.topic_feedback, user_id, event.SerializeToString()
        )
        if not queued:
            await context.abort(
                grpc.StatusCode.RESOURCE_EXHAUSTED, "event queue is full: retry with backoff"
            )
        self._remember_feedback(rid, now if issued is None else issued, now)
        return api_pb2.FeedbackResponse(accepted=True)

    def _not_counted(self, rid: str, user_id: str, issued: int | None, now: int) -> str | None:
        """Why the learner will not count feedback on `rid` sent at `now` (the rules of
        learner/joiner.py and learner/deletions.py, on the same timestamps: the issue
        time is the interaction's), or None. First-format ids carry no issue time: only
        the repeat rule applies to them."""
        wait_ms = int(self.settings.reward_wait_seconds * 1000)
        if issued is not None and now - issued > wait_ms:
            return "late"
        deleted = self.registry.deleted_at(user_id)
        if issued is not None and deleted is not None and issued <= deleted:
            return "user_deleted"
        if self.settings.feedback_aggregation == "earliest" and rid in self._rated:
            return "repeated"
        return None

    def _remember_feedback(self, rid: str, issued: int, now: int) -> None:
        """Note that `rid` got its feedback ("earliest"), forgetting ids whose reward
        window closed and, beyond settings.feedback_memory, the oldest."""
        if self.settings.feedback_aggregation != "earliest":
            return
        wait_ms = int(self.settings.reward_wait_seconds * 1000)
        self._rated[rid] = issued
        while self._rated:
            oldest, issued_at = next(iter(self._rated.items()))
            if len(self._rated) <= self.settings.feedback_memory and now - issued_at <= wait_ms:
                break
            del self._rated[oldest]

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
        recent = _recent_rewards(state)
        return api_pb2.UserState(
            user_id=user_id,
            adapter_version=ref.version if ref else 0,
            updates=int(state.get("updates", 0)),
            recent_reward=statistics.fmean(recent) if recent else 0.0,
            recent_samples=len(recent),
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
        # Both tombstones get their places first: a deletion is recorded whole or refused
        # before anything is forgotten (never one tombstone queued and the call refused).
        held = 0
        while held < 2 and self.events.reserve():
            held += 1
        if held < 2:
            for _ in range(held):
                self.events.unreserve()
            await context.abort(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                "event queue is full, the deletion was not recorded: retry with backoff",
            )
        # What there is of the user (answered as `deleted`), looked at before forgetting.
        existed = self.registry.has_version(user_id) or self.strategy.has_state(user_id)
        if not existed:
            existed = await asyncio.to_thread(self._stored, user_id)
        # Forget here at once (registry, engine slots and host cache, bandit state); the
        # tombstones tell every replica and the learner (which owns the store) to forget.
        # The registry forgets on the loop (a Generate resolving after this line gets the
        # base model); the rest (the registry's on_delete hook) waits for the engine's slot
        # lock, so it runs in a thread.
        self.registry.forget(user_id)
        await asyncio.to_thread(self.registry.release, user_id)
        s = self.settings
        deleted_ms = int(time.time() * 1000)  # not the send time, hours later after an outage
        for topic in (s.topic_adapter_updates, s.topic_bandit_state):
            # a held place: refused only by a queue that is stopping (counted there)
            self.events.publish(topic, user_id, None, timestamp_ms=deleted_ms, reserved=True)
        self.registry.note_deletion(user_id, deleted_ms)  # feedback on older ids: not counted
        return api_pb2.DeleteUserResponse(deleted=existed)

    def _stored(self, user_id: str) -> bool:
        """Whether the store holds versions of the user (False when it cannot be listed)."""
        try:
            return bool(self.store.versions(user_id))
        except OSError as exc:
            log.warning("DeleteUser %s: store not listable (%s)", user_id, exc)
            return False


def _recent_rewards(state: dict[str, Any]) -> list[float]:
    """The rewards of the user's most recent samples, as the learner stored them with the
    version (the rollback guard's window, learner/guard.py)."""
    guard_state = state.get("guard")
    recent = guard_state.get("recent") if isinstance(guard_state, dict) else None
    if not isinstance(recent, list):
        return []
    return [float(r) for r in recent if isinstance(r, int | float) and not isinstance(r, bool)]


@dataclass
class RunningServer:
    server: grpc.aio.Server
    port: int
    service: LoraLoopService
    health: HealthService
    metrics: ServerMetrics | None = None
    auth: AuthInterceptor | None = None
    http: HttpFrontDoor | None = None  # the OpenAI-compatible API (settings.http_port)
    _drain_cut: asyncio.Event = field(default_factory=asyncio.Event, init=False, repr=False)

    def end_drain(self) -> None:
        """Cut the drain window of a `stop()` short (e.g. a second SIGTERM)."""
        self._drain_cut.set()

    async def stop(self, grace: float | None = None, drain: float | None = None) -> None:
        """Shut down as load balancers and Kubernetes expect: health turns NOT_SERVING at
        once (Check and every open Watch) while every call is still answered for `drain`
        seconds (settings.drain_seconds), so pollers take this replica out of rotation;
        then new calls are refused and those in flight get `grace` seconds
        (settings.grace_seconds) to finish; then the engine stops and events are flushed."""
        svc = self.service
        grace = svc.settings.grace_seconds if grace is None else grace
        drain = svc.settings.drain_seconds if drain is None else drain
        await self.health.enter_graceful_shutdown()
        if drain > 0 and not self._drain_cut.is_set():
            log.info("health NOT_SERVING; still answering calls for %.1fs (drain)", drain)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._drain_cut.wait(), drain)
        svc.limit.close()  # new generations: UNAVAILABLE from here on, from our own guard
        self.health.close()  # open Watch streams end now: they would hold the whole grace
        http = self.http.begin_stop(grace) if self.http is not None else None  # beside gRPC
        await self.server.stop(grace)
        if http is not None:
            await http
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
    http_sock = bind_http(settings) if settings.http_port >= 0 else None
    load_context_schema(settings.context_schema_file)  # a bad schema file: before the model
    engine = engine or build_engine(settings)
    await engine.start()
    store = open_adapter_store(settings)
    strategy = StrategyChooser(settings)
    metrics = ServerMetrics()

    def forget_user(user_id: str) -> None:
        """A tombstone (ours or another replica's): drop what this process holds of the user."""
        engine.drop_user(user_id)
        strategy.forget(user_id)
        metrics.forget_user(user_id)

    registry = AdapterRegistry(
        store,
        settings.kafka_bootstrap,
        settings.topic_adapter_updates,
        forget_user,
        model_id=engine.model_id,  # versions for another base model are rejected
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
        strategy=strategy,
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
    # grpc's asyncio health servicer: the synchronous one would hold a default-executor
    # thread (those asyncio.to_thread uses) per Watch call for good (service/health.py)
    health_servicer = HealthService()
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
    http = None
    if http_sock is not None:  # the same service behind a second front door
        http = await start_http(settings, service, health_servicer, metrics, auth, http_sock)
    if auth is not None and credentials is None:
        log.warning(
            "API keys are required but TLS is off: keys cross the network in plaintext. Set "
            "LORALOOP_TLS_CERT_FILE and LORALOOP_TLS_KEY_FILE (helm: tls.enabled), or make "
            "sure a mesh or proxy in front of the server encrypts the traffic"
        )
    for name in ("", SERVICE_NAME):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    log.info(
        "serving %s on %s:%d (%s, API keys %s)",
        engine.model_id,
        settings.host,
        port,
        describe_tls(settings),
        "required" if auth is not None else "off",
    )
    return RunningServer(server, port, service, health_servicer, metrics, auth, http)


async def serve(settings: Settings) -> None:
    """Run until SIGINT/SIGTERM, then shut down gracefully: SIGTERM (Kubernetes, Docker,
    systemd) drains for settings.drain_seconds first (see RunningServer.stop); SIGINT
    (Ctrl-C at a terminal) and a second signal skip what is left of the drain."""
    running = await create_server(settings)
    exporter = None
    if settings.server_metrics_port >= 0 and running.metrics is not None:
        exporter = start_metrics_exporter(
            running.metrics.registry, settings.metrics_host, settings.server_metrics_port
        )
        print(f"loraloop server metrics on {exporter.host}:{exporter.port}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()

    def on_signal(sig: signal.Signals) -> None:
        if stop.is_set() or sig == signal.SIGINT:
            running.end_drain()
        stop.set()

    for sig in (signal.SIGINT, signal.SIGTERM):  # before the ready line, which invites them
        loop.add_signal_handler(sig, on_signal, sig)
    if running.http is not None:  # before the ready line, so whoever waits for it has both
        print(f"loraloop http api on {running.http.url}", flush=True)
    print(f"loraloop server listening on {settings.host}:{running.port}", flush=True)
    await stop.wait()
    await running.stop()
    if exporter is not None:
        exporter.stop()
