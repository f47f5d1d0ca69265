"""Draining the spill journal into Kafka, oldest first, one chunk at a time: only while a
producer is connected and nothing sent directly is outstanding; the chunk's acknowledged
prefix is committed, the rest read again after a back-off."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from functools import partial

from loraloop.service.event_inflight import Chunk, ChunkDone, ChunkResult, Outcome, Outstanding
from loraloop.service.event_producer import ProducerLink
from loraloop.service.event_stats import EventStats
from loraloop.service.missing_topics import MissingTopics, TopicMissing
from loraloop.service.spill_journal import Position, SpillJournal
from loraloop.service.spill_writer import SpillWriter, is_fatal, is_permanent

__all__ = ["JournalDrain"]


@dataclass(eq=False)
class JournalDrain:
    """The chunk being drained lives in `Outstanding`; this keeps the retry back-off and
    the records already acknowledged as originals (`skip`), not to be sent again."""

    journal: SpillJournal
    link: ProducerLink
    outstanding: Outstanding
    missing: MissingTopics
    writer: SpillWriter
    stats: EventStats
    chunk_records: int
    skip: set[Position] = field(default_factory=set, init=False)  # acknowledged as originals
    retry_at: float = field(default=0.0, init=False)
    _failures: int = field(default=0, init=False)

    def step(self) -> None:
        """Finish the current chunk of the journal, or hand the next one to the producer."""
        chunk = self.outstanding.chunk
        if chunk is not None:
            if not chunk.done():
                return
            self.outstanding.chunk = None
            self.finish(chunk)
        if (
            not self.link.usable
            or self.outstanding.events
            or self.journal.pending == 0
            or time.monotonic() < self.retry_at
        ):
            return
        try:
            records = self.journal.read(self.chunk_records)
        except OSError as exc:
            self.stats.warn["spill_error"]("spill journal read failed (%s); retrying", exc)
            self._back_off()
            return
        if records:
            self._send(self.outstanding.start_chunk(records))

    def _send(self, chunk: Chunk) -> None:
        missing: dict[str, ChunkResult] = {}  # topics found missing in this chunk
        for i, (position, event) in enumerate(chunk.records):
            if position in self.skip:
                chunk.results[i] = Outcome.SKIPPED
                continue
            if event.topic in missing:  # tried once per chunk: send() blocks on it
                chunk.results[i] = missing[event.topic]
                continue
            if self.missing.given_up(event.topic):
                chunk.results[i] = Outcome.NO_TOPIC
                continue
            try:
                future = self.link.send(event)
            except Exception as exc:
                result = self.missing.send_failed(self.link.producer, event.topic, exc)
                if result is Outcome.NO_TOPIC or isinstance(result, TopicMissing):
                    missing[event.topic] = chunk.results[i] = result  # go on with other topics
                    continue
                chunk.fail_waiting(result, start=i)
                break
            self.stats.sent += 1
            self.outstanding.report(future, partial(ChunkDone, chunk.id, i))

    def finish(self, chunk: Chunk) -> None:
        """Commit the chunk's acknowledged prefix; the rest is read again after a pause."""
        commit: Position | None = None
        failures: list[BaseException] = []
        for (position, event), result in zip(chunk.records, chunk.results, strict=True):
            if result is Outcome.ACKED:
                self.stats.delivered += 1
                self.stats.drained += 1
                self.missing.found(event.topic)
            elif result is Outcome.NO_TOPIC:
                self.missing.drop(event)  # given up on: done with it
            elif isinstance(result, BaseException):
                if not is_permanent(result):
                    failures.append(result)
                    continue
                self.writer.failed(event, result)  # counted as rejected: done with it
            if failures:
                self.skip.add(position)  # done, behind a failure: skipped when read again
            else:
                commit = position
        if commit is not None:
            self.journal.commit(commit)  # file errors are its own to log and count
            self.skip = {p for p in self.skip if p > commit}
        if not failures:
            self._failures = 0
            return
        self.journal.rewind()
        self._back_off()
        if any(is_fatal(e) for e in failures):
            self.link.needs_reset = True
        self.stats.warn["kafka"](
            "%d of %d spilled events not delivered (%s); retrying",
            len(failures),
            len(chunk.records),
            failures[0],
        )

    def _back_off(self) -> None:
        self._failures += 1
        self.retry_at = time.monotonic() + min(5.0, 0.25 * 2**self._failures)
