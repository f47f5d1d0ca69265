"""Helpers that run the real server and learner for integration and end-to-end tests."""

from __future__ import annotations

import asyncio
import shutil
import threading
import time
import uuid
from collections.abc import Callable, Coroutine, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, Self, TypeVar

import pytest

from loraloop.core.gen.loraloop.v1 import common_pb2, events_pb2
from loraloop.core.kafka.admin import ensure_loraloop_topics
from loraloop.core.kafka.replay import read_to_end
from loraloop.core.settings import Settings
from loraloop.devtools.kafka_broker import KafkaBroker
from loraloop.processes import Process, settings_env

if TYPE_CHECKING:
    from loraloop.learner.loop import Learner

T = TypeVar("T")

__all__ = [
    "CallerThreads",
    "InProcessServer",
    "Process",
    "drain_learner",
    "feedback_event",
    "interaction_event",
    "isolated_settings",
    "own_broker",
    "poll_learner",
    "read_topic",
    "serving",
    "settings_env",
    "wait_until",
]


def isolated_settings(bootstrap: str, tmp: Path, **overrides: Any) -> Settings:
    """Settings with topics, consumer group and store of their own, on the session broker."""
    tag = uuid.uuid4().hex[:8]
    values: dict[str, Any] = {
        "kafka_bootstrap": bootstrap,
        "topic_interactions": f"interactions-{tag}",
        "topic_feedback": f"feedback-{tag}",
        "topic_adapter_updates": f"adapter-updates-{tag}",
        "topic_bandit_state": f"bandit-state-{tag}",
        "topic_dead_letter": f"dead-letter-{tag}",
        "topic_partitions": 2,
        "group_id": f"learner-{tag}",
        "adapter_store": tmp / "adapters",
        "port": 0,
        "kafka_connect_timeout": 5.0,
        # not the published default, which auth_required refuses
        "request_id_secret": f"test-secret-{tag}",
        # servers stopped by a test stop at once; tests of the drain window set their own
        "drain_seconds": 0.0,
    }
    values.update(overrides)
    return Settings(**values)


def wait_until(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(0.05)


def _learner_round(learner: Learner) -> None:
    assert learner.consumer is not None
    polled = learner.consumer.poll(timeout_ms=200)
    learner.process([r for batch in polled.values() for r in batch])


def drain_learner(
    learner: Learner,
    until: Callable[[], bool],
    what: str,
    timeout: float = 60.0,
    each: Callable[[], None] | None = None,
) -> None:
    """Poll and process the learner's records until `until()` holds (`each` runs after
    every round); TimeoutError naming `what` after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not until():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}")
        _learner_round(learner)
        if each is not None:
            each()


def poll_learner(learner: Learner, seconds: float) -> None:
    """Poll and process the learner's records for `seconds`: whatever else is on the
    topics by then is learnt (or skipped) before the caller's checks."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        _learner_round(learner)


class CallerThreads:
    """Closed-loop callers, `_loop(caller)` each on a thread of its own, until the `with`
    block ends (`_stop` is then set); `close()` runs after the threads have ended."""

    def __init__(self, callers: int) -> None:
        self._stop = threading.Event()
        self._threads = [
            threading.Thread(target=self._loop, args=(i,), daemon=True) for i in range(callers)
        ]

    def _loop(self, caller: int) -> None:
        raise NotImplementedError

    def close(self) -> None:
        """What the callers share and must be released (a channel, a client)."""

    def __enter__(self) -> Self:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(60)
        self.close()


class InProcessServer:
    """The real gRPC server on its own event loop thread (for fast integration tests)."""

    def __init__(self, settings: Settings) -> None:
        from loraloop.service.server import create_server

        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._thread.start()
        self.running = asyncio.run_coroutine_threadsafe(create_server(settings), self.loop).result(
            timeout=120
        )
        self.port = self.running.port
        self.target = f"127.0.0.1:{self.port}"

    def call(self, coro: Coroutine[Any, Any, T], timeout: float = 60) -> T:
        """Run `coro` on the server's event loop (e.g. `running.health.set(...)`)."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def stop(self, grace: float = 1.0, drain: float = 0.0) -> None:
        """Stop as on SIGTERM, without a drain window unless asked for (tests that are done
        with a server need no load balancer to notice)."""
        self.call(self.running.stop(grace, drain))
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)


def read_topic(bootstrap: str, topic: str, timeout: float = 20.0) -> list[Any]:
    """Every record currently in `topic`."""
    return list(read_to_end(bootstrap, [topic], timeout))


@contextmanager
def serving(settings: Settings) -> Iterator[InProcessServer]:
    """The settings' topics created and a real server on them, stopped afterwards."""
    ensure_loraloop_topics(settings)
    server = InProcessServer(settings)
    try:
        yield server
    finally:
        server.stop()


@contextmanager
def own_broker(data_dir: Path) -> Iterator[KafkaBroker]:
    """A broker of the caller's own (to stop, kill or freeze), stopped afterwards; skips
    the test where Java or Maven is missing."""
    missing = [tool for tool in ("java", "mvn") if shutil.which(tool) is None]
    if missing:
        pytest.skip(f"the Kafka broker needs {' and '.join(missing)} on PATH")
    broker = KafkaBroker(data_dir=data_dir)
    broker.start(timeout=120)
    try:
        yield broker
    finally:
        broker.stop()


def interaction_event(user: str, rid: str, ts: int, **fields: Any) -> events_pb2.Interaction:
    """A small valid Interaction (4 prompt and 4 response tokens of the tiny model) stamped
    `ts` (ms); `fields` override or add to it."""
    values: dict[str, Any] = {
        "request_id": rid,
        "user_id": user,
        "timestamp_ms": ts,
        "prompt_token_ids": [1, 40, 41, 42],
        "response_token_ids": [50, 51, 52, 2],
        "behaviour_logprobs": [-1.0] * 4,
    }
    values.update(fields)
    return events_pb2.Interaction(**values)


def feedback_event(user: str, rid: str, ts: int, thumbs: int = 1) -> events_pb2.FeedbackEvent:
    """Thumbs feedback on `rid`, stamped `ts` (ms)."""
    return events_pb2.FeedbackEvent(
        request_id=rid,
        user_id=user,
        timestamp_ms=ts,
        signals=common_pb2.FeedbackSignals(thumbs=thumbs),
    )
