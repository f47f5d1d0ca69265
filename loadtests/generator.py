"""The async load generator: simulated users driving Generate/GenerateStream + Feedback.

Each session is one interaction of a simulated user from the demo world: a chat prompt,
the reply (unary `Generate`, or `GenerateStream` for a `stream_share` of sessions, which
measures time to first token), then the `Feedback` that `SimulatedUser.react` gives, so
the learner sees the same traffic as in the demo. Every call is recorded; `report.py`
turns the records into figures.

Open loop: sessions arrive as a Poisson process at `rate_at(t)` whether or not earlier
ones finished, and latency counts from the *scheduled* arrival (no coordinated omission).
Closed loop: `concurrency` workers, each running its next session when the last ends.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import math
import random
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import grpc

from loadtests.config import LoadConfig
from loraloop.client import api_key_metadata, tls_credentials
from loraloop.core.gen.loraloop.v1 import api_pb2, api_pb2_grpc, common_pb2
from loraloop.demo_world import SimulatedUser, make_users

# Status names that are not gRPC codes: the client itself gave up or could not send.
ABANDONED = "ABANDONED"  # still in flight at the hard stop, cancelled
CLIENT_SATURATED = "CLIENT_SATURATED"  # open loop: max_in_flight reached, session not sent


@dataclass
class Call:
    """One RPC as the client saw it; times in seconds from the start of the run."""

    kind: str  # "generate" | "stream" | "feedback"
    user_id: str
    start: float
    latency: float
    code: str  # grpc.StatusCode name, or ABANDONED / CLIENT_SATURATED / CLIENT_<Exception>
    ttft: float | None = None
    tokens: int = 0
    version: int = 0
    reward: float | None = None
    request_id: str = ""

    @property
    def end(self) -> float:
        return self.start + self.latency


@dataclass
class Action:
    """Something a scenario does during the load (kill the learner, stop Kafka ...).

    `run` is blocking and runs in a thread at `at` seconds; what it returns is kept in
    the result under `name`.
    """

    at: float
    name: str
    run: Callable[[], dict[str, Any]]


@dataclass
class RunResult:
    config: LoadConfig
    calls: list[Call]
    elapsed: float  # seconds from the first session to the end of the run
    issue_seconds: float  # seconds during which new sessions were started
    marks: list[tuple[float, str]] = field(default_factory=list)  # (t, what happened)
    actions: dict[str, dict[str, Any]] = field(default_factory=dict)
    users: list[dict[str, str]] = field(default_factory=list)

    @property
    def generations(self) -> list[Call]:
        return [c for c in self.calls if c.kind in ("generate", "stream")]

    @property
    def served_request_ids(self) -> set[str]:
        return {c.request_id for c in self.generations if c.code == "OK" and c.request_id}


def make_load_users(n: int, prefix: str, seed: int = 0) -> list[SimulatedUser]:
    """The demo world's users (tastes cycling through the tones), with ids of this run."""
    return [
        dataclasses.replace(u, user_id=f"{prefix}-{i:04d}")
        for i, u in enumerate(make_users(n, seed))
    ]


def _code(exc: BaseException) -> str:
    if isinstance(exc, grpc.aio.AioRpcError):
        return exc.code().name
    return f"CLIENT_{type(exc).__name__}"


class LoadGenerator:
    """Runs one LoadConfig against its target; `run()` returns the recorded calls."""

    def __init__(self, config: LoadConfig, actions: list[Action] | None = None) -> None:
        self.config = config
        self.actions = sorted(actions or [], key=lambda a: a.at)
        self.users = make_load_users(config.users, config.user_prefix, config.seed)
        self.calls: list[Call] = []
        self.marks: list[tuple[float, str]] = []
        self.action_results: dict[str, dict[str, Any]] = {}
        self._rng = random.Random(config.seed)
        self._t0 = 0.0
        self._sessions = 0
        self._in_flight = 0
        self._stop = asyncio.Event()
        self.on_session: Callable[[Call], None] | None = None  # progress hook
        # From the environment (LORALOOP_API_KEY, LORALOOP_TLS_*), never from the config,
        # which is written into reports.
        self._metadata = api_key_metadata()
        self._credentials = tls_credentials()

    def now(self) -> float:
        return time.monotonic() - self._t0

    # --- one session ---------------------------------------------------------------------
    def _request(self, user: SimulatedUser) -> api_pb2.GenerateRequest:
        request = api_pb2.GenerateRequest(
            user_id=user.user_id,
            sampling=common_pb2.SamplingParams(
                max_tokens=self.config.max_tokens, temperature=self.config.temperature
            ),
        )
        request.messages.messages.append(common_pb2.ChatMessage(role="user", content=user.prompt()))
        return request

    async def _generate(
        self, stub: api_pb2_grpc.LoraLoopStub, user: SimulatedUser, start: float, stream: bool
    ) -> tuple[Call, str]:
        request = self._request(user)
        call = Call("stream" if stream else "generate", user.user_id, start, 0.0, "OK")
        text = ""
        try:
            if stream:
                final = None
                async for msg in stub.GenerateStream(
                    request, timeout=self.config.timeout, metadata=self._metadata
                ):
                    if msg.HasField("final"):
                        final = msg.final
                    elif msg.delta and call.ttft is None:
                        call.ttft = self.now() - start
                if final is None:
                    raise RuntimeError("stream ended without its final message")
                response = final
            else:
                response = await stub.Generate(
                    request, timeout=self.config.timeout, metadata=self._metadata
                )
            text = response.text
            call.request_id = response.request_id
            call.tokens = response.usage.completion_tokens
            call.version = response.adapter_version
            if call.ttft is None and stream:
                call.ttft = self.now() - start  # a reply with no text delta
        except asyncio.CancelledError:
            call.code = ABANDONED
            raise
        except Exception as exc:
            call.code = _code(exc)
        finally:
            call.latency = self.now() - start
            self.calls.append(call)
        return call, text

    async def _session(
        self, stub: api_pb2_grpc.LoraLoopStub, user: SimulatedUser, start: float
    ) -> None:
        self._in_flight += 1
        try:
            stream = self._rng.random() < self.config.stream_share
            gen, text = await self._generate(stub, user, start, stream)
            if gen.code != "OK":
                return
            gen.reward, signals = user.react(text)
            if self.on_session is not None:
                self.on_session(gen)
            if not self.config.feedback:
                return
            fb = Call("feedback", user.user_id, self.now(), 0.0, "OK", request_id=gen.request_id)
            try:
                await stub.Feedback(
                    api_pb2.FeedbackRequest(
                        request_id=gen.request_id,
                        user_id=user.user_id,
                        signals=common_pb2.FeedbackSignals(**signals),  # type: ignore[arg-type]
                    ),
                    timeout=self.config.timeout,
                    metadata=self._metadata,
                )
            except asyncio.CancelledError:
                fb.code = ABANDONED
                raise
            except Exception as exc:
                fb.code = _code(exc)
            finally:
                fb.latency = self.now() - fb.start
                self.calls.append(fb)
        finally:
            self._in_flight -= 1

    # --- arrival models ------------------------------------------------------------------
    def _may_start(self) -> bool:
        cfg = self.config
        if self._stop.is_set():
            return False
        if cfg.duration is not None and self.now() >= cfg.duration:
            return False
        return cfg.requests is None or self._sessions < cfg.requests

    async def _open_loop(self, stub: api_pb2_grpc.LoraLoopStub, tasks: set[asyncio.Task]) -> None:
        cfg = self.config
        peak = cfg.rate * max([1.0, *(b.factor for b in cfg.bursts)])
        end = math.inf if cfg.duration is None else cfg.duration
        next_at = 0.0
        while True:
            # A Poisson process whose rate changes over time (ramp, bursts), by thinning:
            # candidates at the peak rate, each kept with probability rate_at(t) / peak.
            next_at += self._rng.expovariate(peak)
            if next_at < end and self._rng.random() * peak > cfg.rate_at(next_at):
                continue
            delay = min(next_at, end) - self.now()  # never sleep past the end of the run
            if delay > 0:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._stop.wait(), delay)
            if next_at >= end:
                return
            if not self._may_start():
                return
            self._sessions += 1
            user = self._rng.choice(self.users)
            if self._in_flight >= cfg.max_in_flight:
                self.calls.append(Call("generate", user.user_id, next_at, 0.0, CLIENT_SATURATED))
                continue
            task = asyncio.create_task(self._session(stub, user, next_at))
            tasks.add(task)
            task.add_done_callback(tasks.discard)

    async def _worker(self, stub: api_pb2_grpc.LoraLoopStub, index: int) -> None:
        cfg = self.config
        if cfg.ramp > 0:  # workers join evenly over the ramp
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), cfg.ramp * index / cfg.concurrency)
        mine = self.users[index % len(self.users) :: cfg.concurrency] or self.users
        turn = 0
        while self._may_start():
            self._sessions += 1
            await self._session(stub, mine[turn % len(mine)], self.now())
            turn += 1
            if cfg.think > 0:
                await asyncio.sleep(self._rng.expovariate(1 / cfg.think))

    # --- the run -------------------------------------------------------------------------
    async def _action(self, action: Action) -> None:
        delay = action.at - self.now()
        if delay > 0:
            await asyncio.sleep(delay)
        self.marks.append((self.now(), f"{action.name} start"))
        try:
            self.action_results[action.name] = await asyncio.to_thread(action.run)
        except Exception as exc:  # reported, not fatal: the load goes on
            self.action_results[action.name] = {"error": f"{type(exc).__name__}: {exc}"}
        self.marks.append((self.now(), f"{action.name} end"))

    async def run(self) -> RunResult:
        cfg = self.config
        loop = asyncio.get_running_loop()
        with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
            loop.add_signal_handler(signal.SIGINT, self._stop.set)  # Ctrl-C: stop issuing
        options = [("grpc.max_concurrent_streams", 10_000)]
        channel = (
            grpc.aio.secure_channel(cfg.target, self._credentials, options=options)
            if self._credentials is not None
            else grpc.aio.insecure_channel(cfg.target, options=options)
        )
        async with channel:
            await asyncio.wait_for(channel.channel_ready(), 60)
            stub = api_pb2_grpc.LoraLoopStub(channel)
            self._t0 = time.monotonic()
            actions = [asyncio.create_task(self._action(a)) for a in self.actions]
            tasks: set[asyncio.Task] = set()
            if cfg.mode == "open":
                await self._open_loop(stub, tasks)
            else:
                workers = [
                    asyncio.create_task(self._worker(stub, i)) for i in range(cfg.concurrency)
                ]
                tasks.update(workers)
                await self._wait_issuing(workers)
            issue_seconds = self.now()
            if cfg.mode == "closed":
                self._stop.set()  # workers finish their current session and stop
            # Hard stop: what is still in flight `hard_stop` s after issuing ended is cancelled.
            if tasks:
                _, pending = await asyncio.wait(tasks, timeout=cfg.hard_stop)
                for task in pending:
                    task.cancel()
                await asyncio.gather(*pending, return_exceptions=True)
            self.marks.append((self.now(), "load end"))
            await asyncio.gather(*actions)  # scenario actions are bounded by their own timeouts
        with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
            loop.remove_signal_handler(signal.SIGINT)
        return RunResult(
            config=cfg,
            calls=sorted(self.calls, key=lambda c: c.start),
            elapsed=max([issue_seconds, *(c.end for c in self.calls)]),
            issue_seconds=issue_seconds,
            marks=sorted(self.marks),
            actions=self.action_results,
            users=[{"user_id": u.user_id, "likes": u.likes} for u in self.users],
        )

    async def _wait_issuing(self, workers: list[asyncio.Task]) -> None:
        """Closed loop: return once no new session may start, or every worker is done."""
        while self._may_start() and not all(w.done() for w in workers):
            await asyncio.sleep(0.02)


def run_load(config: LoadConfig, actions: list[Action] | None = None) -> RunResult:
    """Run one load test to the end (blocking) and return what happened."""
    return asyncio.run(LoadGenerator(config, actions).run())
