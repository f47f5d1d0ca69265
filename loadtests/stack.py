"""The system under test, started by the load test itself: Kafka, server, learner.

Everything is the real thing (`loraloop.devtools.kafka_broker.KafkaBroker`, `loraloop serve` and
`loraloop learn` as child processes), so scenarios can kill the learner or stop Kafka
mid-run and see what the system does.
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Iterable
from pathlib import Path
from types import TracebackType
from typing import Any

from loraloop.client import LoraLoopClient
from loraloop.core.gen.loraloop.v1 import events_pb2
from loraloop.core.kafka.admin import ensure_loraloop_topics
from loraloop.core.kafka.replay import read_to_end
from loraloop.core.settings import Settings
from loraloop.devtools.kafka_broker import KafkaBroker
from loraloop.devtools.tiny_model import ensure_tiny_model
from loraloop.processes import Process

SERVER_READY = r"listening on [\d.]+:(\d+)"
VLLM_PYTHON = Path(__file__).resolve().parents[1] / ".venv-vllm" / "bin" / "python"
LEARNER_READY = r"learner consuming"


def count_request_ids(bootstrap: str, topic: str, timeout: float = 30.0) -> set[str]:
    """Request ids of every Interaction/FeedbackEvent now in `topic` (read to its end)."""
    parse = (
        events_pb2.FeedbackEvent.FromString
        if "feedback" in topic
        else events_pb2.Interaction.FromString
    )
    return {parse(r.value).request_id for r in read_to_end(bootstrap, [topic], timeout) if r.value}


def events_lost(bootstrap: str, topic: str, served: set[str], settle: float = 30.0) -> dict:
    """Served request ids with no event in `topic`, re-read until none is missing or
    `settle` seconds pass (the server's event log may still be catching up)."""
    deadline = time.monotonic() + settle
    while True:
        missing = served - count_request_ids(bootstrap, topic)
        if not missing or time.monotonic() > deadline:
            return {
                "served": len(served),
                "in_kafka": len(served) - len(missing),
                "lost": len(missing),
            }
        time.sleep(2.0)


class Stack:
    """Kafka + `loraloop serve` + (optionally) `loraloop learn`, logs under `out`."""

    def __init__(
        self,
        out: Path,
        *,
        learner: bool = True,
        adapter_slots: int = 64,
        max_batch_size: int = 16,
        learning_rate: float = 2e-3,
        engine: str = "hf",
    ) -> None:
        self.out = out
        self.with_learner = learner
        self.engine = engine
        self.overrides: dict[str, Any] = {
            "adapter_slots": adapter_slots,
            "max_batch_size": max_batch_size,
            "learning_rate": learning_rate,
        }
        self.broker: KafkaBroker | None = None
        self.server: Process | None = None
        self.learner: Process | None = None
        self.settings: Settings | None = None
        self._learner_starts = 0

    # --- lifecycle -----------------------------------------------------------------------
    def start(self) -> Stack:
        shutil.rmtree(self.out / "adapters", ignore_errors=True)
        shutil.rmtree(self.out / "kafka", ignore_errors=True)
        self.out.mkdir(parents=True, exist_ok=True)
        self.broker = KafkaBroker(data_dir=self.out / "kafka", log_level="WARN")
        bootstrap = self.broker.start(timeout=120)
        # drain 0: a stack stopped by its scenario has no load balancer to drain from
        settings: dict[str, object] = {"model": "", "drain_seconds": 0.0, **self.overrides}
        if not settings["model"]:
            # No model given: the tiny one, built (or found) here, before the children start.
            settings["model"] = str(ensure_tiny_model(progress=False))
        self.settings = Settings(
            kafka_bootstrap=bootstrap,
            port=0,
            adapter_store=(self.out / "adapters").resolve(),
            **settings,
        )
        ensure_loraloop_topics(self.settings)
        self.server = self._start_server()
        if self.with_learner:
            self.start_learner()
        with LoraLoopClient(self.target, timeout=60) as client:
            client.wait_ready()
        return self

    def _start_server(self) -> Process:
        """`loraloop serve` with the stack's engine: the vllm one runs under the vllm
        environment (`make vllm`; LORALOOP_VLLM_PYTHON names another interpreter)."""
        assert self.settings is not None
        if self.engine == "hf":
            return Process(["serve"], self.settings, SERVER_READY, log=self.out / "server.log")
        python = os.environ.get("LORALOOP_VLLM_PYTHON") or str(VLLM_PYTHON)
        if not Path(python).is_file():
            raise RuntimeError(f"the vllm engine needs {python}: run `make vllm` first")
        settings = self.settings.model_copy(update={"engine": self.engine})
        return Process(
            ["serve"], settings, SERVER_READY, 300, self.out / "server.log", python=python
        )

    def adapter_updates(self) -> int:
        """AdapterUpdated records on the topic now (versions the learner published)."""
        assert self.settings is not None
        records = read_to_end(self.bootstrap, [self.settings.topic_adapter_updates], 30.0)
        return sum(1 for r in records if r.value)

    def start_learner(self) -> None:
        assert self.settings is not None
        self._learner_starts += 1
        self.learner = Process(
            ["learn"],
            self.settings,
            LEARNER_READY,
            log=self.out / f"learner-{self._learner_starts}.log",
        )

    def close(self) -> None:
        for proc in (self.learner, self.server):
            if proc is not None and proc.proc.poll() is None:
                proc.stop()
        if self.broker is not None:
            self.broker.stop()

    def __enter__(self) -> Stack:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    @property
    def target(self) -> str:
        assert self.server is not None and self.server.match is not None
        return f"127.0.0.1:{self.server.match.group(1)}"

    @property
    def bootstrap(self) -> str:
        assert self.broker is not None
        return self.broker.bootstrap

    # --- what scenarios do ---------------------------------------------------------------
    def learner_progress(self, user_ids: Iterable[str]) -> dict[str, int]:
        """Sum of learner updates and the newest adapter version over `user_ids`."""
        updates = newest = 0
        with LoraLoopClient(self.target, timeout=30, retries=1) as client:
            for user in user_ids:
                state = client.user_state(user)
                updates += state.updates
                newest = max(newest, state.adapter_version)
        return {"updates": updates, "max_version": newest}

    def restart_learner(self, user_ids: list[str], down: float = 0.0) -> dict[str, Any]:
        """SIGKILL the learner (a crash), wait `down` s, start a new one."""
        before = self.learner_progress(user_ids)
        started = time.monotonic()
        if self.learner is not None:
            self.learner.kill()
        time.sleep(down)
        self.start_learner()
        return {
            "updates_at_kill": before["updates"],
            "max_version_at_kill": before["max_version"],
            "restart_s": round(time.monotonic() - started, 2),
        }

    def kafka_outage(self, seconds: float) -> dict[str, Any]:
        """Stop the broker for `seconds`, then start it again on the same port and data."""
        assert self.broker is not None
        started = time.monotonic()
        self.broker.stop()
        stopped = time.monotonic()
        time.sleep(seconds)
        self.broker.start(timeout=120)
        return {
            "stop_s": round(stopped - started, 2),
            "down_s": round(time.monotonic() - stopped, 2),
            "restart_s": round(time.monotonic() - stopped - seconds, 2),
        }
