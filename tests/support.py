"""Helpers that run the real server and learner for integration and end-to-end tests."""

from __future__ import annotations

import asyncio
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from core.kafka.replay import read_to_end
from core.settings import Settings
from loraloop.processes import Process, settings_env

__all__ = [
    "InProcessServer",
    "Process",
    "isolated_settings",
    "read_topic",
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
    }
    values.update(overrides)
    return Settings(**values)


def wait_until(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(0.05)


class InProcessServer:
    """The real gRPC server on its own event loop thread (for fast integration tests)."""

    def __init__(self, settings: Settings) -> None:
        from service.server import create_server

        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._thread.start()
        self.running = asyncio.run_coroutine_threadsafe(create_server(settings), self.loop).result(
            timeout=120
        )
        self.port = self.running.port
        self.target = f"127.0.0.1:{self.port}"

    def stop(self, grace: float = 1.0) -> None:
        asyncio.run_coroutine_threadsafe(self.running.stop(grace), self.loop).result(60)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)


def read_topic(bootstrap: str, topic: str, timeout: float = 20.0) -> list[Any]:
    """Every record currently in `topic`."""
    return list(read_to_end(bootstrap, [topic], timeout))
