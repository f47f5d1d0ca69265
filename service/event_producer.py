"""The event log's Kafka producer: connected in the background (its constructor waits for
Kafka), abandoned and force-closed when Kafka stops answering or it fails for good, and
replaced by a new one."""

from __future__ import annotations

import contextlib
import threading
import time

from kafka import KafkaProducer
from kafka.errors import KafkaError
from kafka.future import Future

from loraloop.core.kafka.producers import force_close
from loraloop.service.event_stats import Warn, log
from loraloop.service.spill_journal import SpilledEvent

__all__ = ["MAX_BLOCK_MS", "ProducerLink"]

MAX_BLOCK_MS = 1000  # send() waiting for a topic's metadata, on the sender thread


class ProducerLink:
    """The current producer (None while none is connected) and its replacement."""

    def __init__(
        self,
        bootstrap: str,
        client_id: str,
        request_seconds: float,
        stopping: threading.Event,
        warn: Warn,
    ) -> None:
        self._bootstrap = bootstrap
        self._client_id = client_id
        self._request_ms = max(1000, int(1000 * request_seconds))
        self._stopping = stopping
        self._warn = warn
        self.producer: KafkaProducer | None = None
        self.needs_reset = False  # it failed fatally: replace it once nothing is outstanding
        self.connected = threading.Event()
        self.connect_started = time.monotonic()
        self._connector: threading.Thread | None = None

    @property
    def usable(self) -> bool:
        """A producer is connected and needs no replacement."""
        return self.producer is not None and not self.needs_reset

    def start_connector(self) -> None:
        if self._connector is not None and self._connector.is_alive():
            return
        self.connect_started = time.monotonic()
        self._connector = threading.Thread(
            target=self._connect, name="event-log-connect", daemon=True
        )
        self._connector.start()

    def join(self, timeout: float) -> None:
        if self._connector is not None:
            self._connector.join(timeout)

    def _connect(self) -> None:
        """Create a producer (its constructor waits for Kafka), off the sender thread."""
        while not self._stopping.is_set():
            try:
                producer = KafkaProducer(
                    bootstrap_servers=self._bootstrap,
                    client_id=self._client_id,
                    acks="all",
                    enable_idempotence=True,
                    # up to 50 ms for a batch: at tens of events a second a shorter linger
                    # sends each event in a produce request of its own, and the pure-
                    # Python client's per-request cost was 0.3 ms of server CPU a call
                    linger_ms=50,
                    max_block_ms=MAX_BLOCK_MS,  # send() waiting for metadata, on our thread
                    # A request is timed out by the producer when we would abandon it.
                    request_timeout_ms=self._request_ms,
                    delivery_timeout_ms=max(30_000, 3 * self._request_ms),
                    reconnect_backoff_max_ms=1000,
                    bootstrap_timeout_ms=2000,
                )
            except KafkaError as exc:
                self._warn("Kafka at %s unreachable: %s", self._bootstrap, exc)
                self._stopping.wait(0.5)
                continue
            if self._stopping.is_set():
                producer.close(timeout=1)
                return
            self.producer = producer
            self.connected.set()
            log.info("event log connected to Kafka at %s", self._bootstrap)
            return

    def send(self, event: SpilledEvent) -> Future:
        """Hand `event` to the producer (raises what send() raises)."""
        assert self.producer is not None
        return self.producer.send(
            event.topic, key=event.key, value=event.value, timestamp_ms=event.timestamp_ms
        )

    def abandon(self) -> None:
        """Give up on the producer: force-close it with whatever it still holds."""
        producer, self.producer = self.producer, None
        self.connected.clear()
        self.needs_reset = False
        if producer is not None:
            force_close(producer)

    def close(self, force: bool) -> None:
        """Close the producer at stop: at once if `force` (it holds records), else after
        its flush."""
        producer, self.producer = self.producer, None
        if producer is None:
            return
        if force:
            force_close(producer)
        else:
            with contextlib.suppress(Exception):
                producer.close(timeout=2)
