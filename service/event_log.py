"""Interaction and feedback events to Kafka without ever blocking a request.

Requests put events on a bounded in-memory queue and return; one sender thread owns the
Kafka producer (idempotent, acks=all). While Kafka is unreachable the thread keeps
retrying and events wait in the queue; when the queue is full, new events are dropped and
counted. Serving keeps answering either way.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import threading
import time

from kafka import KafkaProducer
from kafka.errors import KafkaError

log = logging.getLogger(__name__)


class EventLog:
    def __init__(self, bootstrap: str, max_queue: int, client_id: str = "loraloop-server"):
        self._bootstrap = bootstrap
        self._client_id = client_id
        self._queue: queue.Queue[tuple[str, bytes, bytes | None] | None] = queue.Queue(max_queue)
        self._producer: KafkaProducer | None = None
        self._thread = threading.Thread(target=self._run, name="event-log", daemon=True)
        self._stopping = threading.Event()
        self.accepted = 0  # queued
        self.sent = 0  # handed to the producer
        self.dropped = 0  # refused because the queue was full
        self.connected = threading.Event()

    def start(self) -> None:
        self._thread.start()

    def publish(self, topic: str, key: str, value: bytes | None) -> bool:
        """Queue an event (None: a tombstone); False, and counted, when the queue is full."""
        try:
            self._queue.put_nowait((topic, key.encode(), value))
            self.accepted += 1
            return True
        except queue.Full:
            self.dropped += 1
            return False

    @property
    def depth(self) -> int:
        return self._queue.qsize()

    def _connect(self) -> KafkaProducer:
        while not self._stopping.is_set():
            try:
                producer = KafkaProducer(
                    bootstrap_servers=self._bootstrap,
                    client_id=self._client_id,
                    acks="all",
                    enable_idempotence=True,
                    linger_ms=5,
                    retries=2**31 - 1,
                    max_block_ms=2000,
                    bootstrap_timeout_ms=2000,
                )
                self.connected.set()
                return producer
            except KafkaError as exc:
                log.warning("Kafka at %s unreachable (%s); events queue up", self._bootstrap, exc)
                self._stopping.wait(2.0)
        raise RuntimeError("stopped before Kafka was reachable")

    def _run(self) -> None:
        try:
            self._producer = self._connect()
        except RuntimeError:
            return
        while True:
            item = self._queue.get()
            if item is None:
                break
            topic, key, value = item
            while True:
                try:
                    self._producer.send(topic, key=key, value=value)
                    self.sent += 1
                    break
                except KafkaError as exc:  # metadata unavailable: keep the event, retry
                    log.warning("Kafka send to %s failed (%s); retrying", topic, exc)
                    time.sleep(0.5)
        self._producer.flush(timeout=10)
        self._producer.close(timeout=10)

    def flush(self, timeout: float = 10.0) -> None:
        """Wait until every queued event has been handed to Kafka and acknowledged."""
        deadline = time.monotonic() + timeout
        while self.sent < self.accepted:
            if time.monotonic() > deadline:
                return
            time.sleep(0.01)
        if self._producer is not None:
            self._producer.flush(timeout=max(0.0, deadline - time.monotonic()))

    def stop(self, timeout: float = 10.0) -> None:
        """Send what is queued (within `timeout`), then close the producer."""
        self._stopping.set()
        with contextlib.suppress(queue.Full):
            self._queue.put(None, timeout=timeout)
        self._thread.join(timeout)
