"""What the sender has handed to the Kafka producer and Kafka has not acknowledged yet: events
sent straight from the queue, one chunk of journal records, and the typed results their
delivery callbacks report from the producer's I/O thread.

A completion is a small tagged union, `DirectDone | ChunkDone`: the callbacks only append one
to a deque (thread-safe), and the sender thread applies them in order (`match`). A chunk's
per-record result is `ChunkResult`: None while waiting, then an `Outcome` or the exception
the record failed with.
"""

from __future__ import annotations

import collections
import enum
import itertools
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from kafka.future import Future

from loraloop.service.spill_journal import Position, Record, SpilledEvent

__all__ = [
    "Chunk",
    "ChunkDone",
    "ChunkResult",
    "Completion",
    "DirectDone",
    "InFlight",
    "Outcome",
    "Outstanding",
]


@dataclass(frozen=True, slots=True)
class DirectDone:
    """Kafka's answer for an event sent straight from the queue (error None: acknowledged)."""

    token: int
    error: BaseException | None


@dataclass(frozen=True, slots=True)
class ChunkDone:
    """Kafka's answer for record `index` of journal chunk `chunk_id` (None: acknowledged)."""

    chunk_id: int
    index: int
    error: BaseException | None


Completion = DirectDone | ChunkDone


class Outcome(enum.Enum):
    """How a record of a journal chunk is done with, other than by failing."""

    ACKED = "acked"  # acknowledged by Kafka
    SKIPPED = "skipped"  # its event was acknowledged as an original before it was read
    NO_TOPIC = "no_topic"  # dropped (and counted) because its topic is missing


ChunkResult = Outcome | BaseException | None  # None: still waiting for Kafka


@dataclass
class InFlight:
    """An event handed to the producer, not acknowledged yet."""

    event: SpilledEvent
    sent_at: float
    copy: Position | None = None  # its copy in the journal, made when Kafka stalled


@dataclass
class Chunk:
    """Journal records handed to the producer together; results[i] is record i's."""

    id: int
    records: list[Record]
    sent_at: float
    results: list[ChunkResult] = field(default_factory=list)

    def done(self) -> bool:
        return all(r is not None for r in self.results)

    def fail_waiting(self, exc: BaseException, start: int = 0) -> None:
        """Records from `start` on that are still waiting failed with `exc`."""
        self.results[start:] = [exc if r is None else r for r in self.results[start:]]

    def apply(self, done: ChunkDone) -> None:
        self.results[done.index] = Outcome.ACKED if done.error is None else done.error


class Outstanding:
    """Events waiting for Kafka's acknowledgement, oldest first, and the current chunk.

    Written by the sender thread only (the producer's thread appends to `completions`);
    `oldest`, `idle` and `in_producer_only` are read from any thread."""

    def __init__(self) -> None:
        self.events: dict[int, InFlight] = {}  # token -> event, oldest first
        self.copied = True  # every in-flight event has been offered to the journal
        self.copies = 0  # in-flight events with a copy in the journal
        self.chunk: Chunk | None = None
        self.completions: collections.deque[Completion] = collections.deque()
        self._ids = itertools.count()  # tokens and chunk ids

    def track(self, event: SpilledEvent) -> int:
        """A token for `event`, about to be handed to the producer."""
        token = next(self._ids)
        self.events[token] = InFlight(event, time.monotonic())
        self.copied = False
        return token

    def untrack(self, token: int) -> None:
        pending = self.events.pop(token)
        self.copies -= pending.copy is not None

    def start_chunk(self, records: list[Record]) -> Chunk:
        self.chunk = Chunk(next(self._ids), records, time.monotonic(), [None] * len(records))
        return self.chunk

    def report(self, future: Future, done: Callable[[BaseException | None], Completion]) -> None:
        """Have the future's callbacks (on the producer's thread) queue `done(error)`."""
        future.add_callback(lambda _meta: self.completions.append(done(None)))
        future.add_errback(lambda exc: self.completions.append(done(exc)))

    def copy_all(
        self, spill: Callable[[SpilledEvent], Position | None], again: bool = False
    ) -> None:
        """Offer each in-flight event without a copy to the journal, once (`again`: also
        those whose copy failed before)."""
        if self.copied and not again:
            return
        for pending in list(self.events.values()):
            if pending.copy is None:
                pending.copy = spill(pending.event)
                self.copies += pending.copy is not None
        self.copied = True

    @property
    def in_producer_only(self) -> int:
        """In-flight events without a copy in the journal."""
        return len(self.events) - self.copies

    def idle(self) -> bool:
        """Nothing handed to the producer is outstanding."""
        return not self.events and self.chunk is None

    def busy(self) -> bool:
        return bool(self.events or self.chunk or self.completions)

    def oldest(self) -> float | None:
        """When the oldest event still waiting for Kafka's acknowledgement was sent."""
        try:
            oldest: float | None = next(iter(self.events.values())).sent_at
        except (StopIteration, RuntimeError):  # RuntimeError: changed by the sender thread
            oldest = None
        chunk = self.chunk
        if chunk is not None and (oldest is None or chunk.sent_at < oldest):
            oldest = chunk.sent_at
        return oldest

    def stalled(self, seconds: float) -> bool:
        """Kafka has not acknowledged an outstanding event for `seconds`."""
        oldest = self.oldest()
        return oldest is not None and time.monotonic() - oldest > seconds
