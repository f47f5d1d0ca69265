"""The event log's sender thread: takes events off the queue and routes each straight to the
producer or into the spill journal, applies Kafka's answers, watches for a stalled or gone
Kafka (copies to the journal, then abandons the producer), drains the journal, and at stop
delivers what Kafka takes before its deadline. It survives any error: logs it, counts it
in `sender_errors`, backs off and goes on."""

from __future__ import annotations

import contextlib
import queue
import threading
import time
from dataclasses import dataclass, field
from functools import partial

from kafka.errors import KafkaTimeoutError

from loraloop.service.event_inflight import ChunkDone, DirectDone, Outcome, Outstanding
from loraloop.service.event_producer import ProducerLink
from loraloop.service.event_stats import EventStats, log
from loraloop.service.journal_drain import JournalDrain
from loraloop.service.missing_topics import MissingTopics
from loraloop.service.spill_journal import SpilledEvent, SpillJournal
from loraloop.service.spill_writer import SpillWriter, is_permanent

__all__ = ["STOP", "EventQueue", "Sender", "Stop", "StopRequest"]

_TAKE = 512  # events taken off the queue per turn of the sender loop


class Stop:
    """The type of `STOP`, stop()'s marker on the queue: it only ends the sender's wait."""


STOP = Stop()
EventQueue = queue.Queue[SpilledEvent | Stop]


@dataclass
class StopRequest:
    """stop()'s request to the sender thread."""

    stopping: threading.Event
    timeout: float  # drain_seconds, or stop()'s timeout
    deadline: float | None = None  # set by stop(): when the sender must end
    taken: bool = False  # the sender took the marker (or found the queue empty) once stopping


@dataclass(kw_only=True, eq=False)
class Sender:
    """The sender thread's loop, over the event log's parts."""

    events: EventQueue
    journal: SpillJournal
    stats: EventStats
    link: ProducerLink
    outstanding: Outstanding
    missing: MissingTopics
    writer: SpillWriter
    drain: JournalDrain
    stop: StopRequest
    stall_seconds: float
    abandon_seconds: float
    _error_pause: float = field(default=0.0, init=False)  # back-off after an unexpected error

    def run(self) -> None:
        self.writer.load()
        while not self.stop.taken:
            try:
                self._turn()
            except Exception as exc:  # never let the thread die: every event would be lost
                self._error(exc)
        try:
            self._shutdown(self.stop.timeout)
        except Exception as exc:
            self._error(exc)
            with contextlib.suppress(Exception):
                self.journal.close()

    def _turn(self) -> None:
        """One turn of the sender loop."""
        self.writer.load()
        self._settle()
        if self._waiting_for_first_connection():
            time.sleep(0.02)
            return
        stopping = self.stop.stopping.is_set()
        items = self._take(timeout=0.02 if self.outstanding.busy() or stopping else 0.1)
        if stopping and not items:  # stop() began and the queue is empty: no marker needed
            self.stop.taken = True
        for item in items:
            if isinstance(item, Stop):
                self.stop.taken = True
                break
            self._place(item)
        self._settle()
        self._watch()
        self.drain.step()
        self.writer.sync(force=False)
        self._error_pause = 0.0

    def _error(self, exc: BaseException) -> None:
        """Log and count an unexpected error of the sender thread, then back off."""
        self.stats.sender_errors += 1
        self.stats.warn["sender"]("event log sender: unexpected error (it goes on)", exc_info=exc)
        self._error_pause = min(2.0, max(0.05, 2 * self._error_pause))
        time.sleep(self._error_pause)

    def _waiting_for_first_connection(self) -> bool:
        """Right after start, events wait in memory (up to stall_seconds) for the producer."""
        return (
            self.link.producer is None
            and self.stats.delivered == 0
            and not self.stop.stopping.is_set()
            and time.monotonic() - self.link.connect_started < self.stall_seconds
        )

    def _take(self, timeout: float) -> list[SpilledEvent | Stop]:
        try:
            items = [self.events.get(timeout=timeout)]
        except queue.Empty:
            return []
        with contextlib.suppress(queue.Empty):
            while len(items) < _TAKE and not isinstance(items[-1], Stop):
                items.append(self.events.get_nowait())
        return items

    # --- one event ----------------------------------------------------------------------
    def _place(self, event: SpilledEvent) -> None:
        """Route an event taken off the queue; one lost to an unexpected error is counted."""
        try:
            self._route(event)
        except Exception as exc:
            self.stats.dropped["sender_error"] += 1
            self._error(exc)
        finally:
            self.stats.routed += 1

    def spilling(self) -> bool:
        """Whether new events go to the journal rather than straight to Kafka."""
        return (
            self.link.producer is None
            or self.journal.pending > 0
            or self.outstanding.stalled(self.stall_seconds)
        )

    def _route(self, event: SpilledEvent) -> None:
        if (
            not self.link.usable
            or self.journal.pending > 0
            or self.outstanding.chunk is not None
            or self.outstanding.stalled(self.stall_seconds)
        ):
            self._copy_inflight()  # older events first: the journal keeps their order
            self.writer.spill(event)
        elif self.missing.given_up(event.topic):
            self.missing.drop(event)
        else:
            self._send(event)

    def _send(self, event: SpilledEvent) -> None:
        token = self.outstanding.track(event)
        try:
            future = self.link.send(event)
        except Exception as exc:  # no metadata within max_block_ms, a closed producer, ...
            self.outstanding.untrack(token)
            result = self.missing.send_failed(self.link.producer, event.topic, exc)
            if result is Outcome.NO_TOPIC:
                self.missing.drop(event)
            else:
                self.writer.failed(event, result)
            return
        self.stats.sent += 1
        self.outstanding.report(future, partial(DirectDone, token))

    def _copy_inflight(self, again: bool = False) -> None:
        self.outstanding.copy_all(self.writer.copy, again)

    # --- Kafka's answers ----------------------------------------------------------------
    def _settle(self) -> None:
        """Apply the delivery results the producer's thread reported."""
        completions = self.outstanding.completions
        while completions:
            match completions.popleft():
                case ChunkDone() as in_chunk:
                    chunk = self.outstanding.chunk
                    if chunk is not None and chunk.id == in_chunk.chunk_id:
                        chunk.apply(in_chunk)
                case DirectDone() as direct:
                    self._settle_direct(direct)

    def _settle_direct(self, done: DirectDone) -> None:
        pending = self.outstanding.events.get(done.token)
        if pending is None:  # given up on when the producer was abandoned
            return
        exc = done.error
        if exc is None:
            self.stats.delivered += 1
            self.missing.found(pending.event.topic)
            if pending.copy is not None:
                self.drain.skip.add(pending.copy)  # delivered: its copy is not sent again
        elif pending.copy is None:
            self.writer.failed(pending.event, exc)
        elif is_permanent(exc):  # its copy would fail the same way
            self.drain.skip.add(pending.copy)
            self.writer.failed(pending.event, exc)
        self.outstanding.untrack(done.token)  # after the journal has it: flush() sees no gap

    def _watch(self) -> None:
        """Copy to the journal when Kafka stalls; abandon the producer when it is gone."""
        oldest = self.outstanding.oldest()
        waited = 0.0 if oldest is None else time.monotonic() - oldest
        if waited > self.stall_seconds:
            self._copy_inflight()
        if self.link.producer is not None and waited > self.abandon_seconds:
            self._abandon(f"no acknowledgement from Kafka for {waited:.1f} s")
        elif self.link.needs_reset and self.outstanding.idle():
            self._abandon("the producer failed fatally")

    def _abandon(self, why: str) -> None:
        """Give up on the producer: what it holds counts as failed (copies of it are in the
        journal); a new one connects in the background."""
        self._settle()  # results the producer reported before we gave up still count
        self.link.abandon()
        gone = KafkaTimeoutError(f"producer abandoned: {why}")
        for token, pending in list(self.outstanding.events.items()):
            if pending.copy is None:
                self.writer.failed(pending.event, gone)
            self.outstanding.untrack(token)
        chunk, self.outstanding.chunk = self.outstanding.chunk, None
        if chunk is not None:
            chunk.fail_waiting(gone)
            self.drain.finish(chunk)
        self.stats.warn["kafka"]("event log: %s; events spill while a new producer connects", why)
        if not self.stop.stopping.is_set():
            self.link.start_connector()

    # --- stop ---------------------------------------------------------------------------
    def _shutdown(self, timeout: float) -> None:
        """Deliver what Kafka takes within `timeout` (and before stop()'s deadline); leave
        the rest in the journal; close."""
        deadline = time.monotonic() + timeout
        if self.stop.deadline is not None:
            deadline = min(deadline, self.stop.deadline)
        with contextlib.suppress(queue.Empty):
            while True:  # published after stop() began
                item = self.events.get_nowait()
                if not isinstance(item, Stop):
                    self._place(item)
        while time.monotonic() < deadline:
            self._settle()
            self._watch()  # abandons a producer that no longer answers: then we stop
            self.drain.step()
            if self.link.producer is None or self.drain.retry_at > deadline:
                break  # Kafka is not answering: what is left stays in the journal
            if self.outstanding.idle() and self.journal.pending == 0:
                break
            time.sleep(0.01)  # a chunk Kafka failed is retried after its back-off
        self._settle()
        self._copy_inflight(again=True)  # not acknowledged yet: the next start sends it (again)
        self.writer.sync(force=True)
        self.link.close(force=not self.outstanding.idle())
        self.stats.left_at_stop = left = self.journal.pending
        if left:
            log.warning(
                "event log stopped with %d events in the spill journal %s (Kafka %s); the "
                "next start on this directory delivers them",
                left,
                self.journal.dir,
                "did not answer" if time.monotonic() < deadline else "too slow to finish",
            )
        self.journal.close()
