"""Join interactions with their feedback by request_id, whichever arrives first.

It also knows, per partition, the lowest offset still held in memory, which is the
offset that is safe to commit: everything before it has been applied (or dropped by
rule), so a crash replays exactly what was not yet applied.
"""

from __future__ import annotations

import time
from collections import defaultdict
from dataclasses import dataclass, field

from core.gen.loraloop.v1 import events_pb2

Position = tuple[str, int, int]  # (topic, partition, offset)


@dataclass
class Sample:
    """One interaction with its feedback: the unit of learning."""

    interaction: events_pb2.Interaction
    feedback: events_pb2.FeedbackEvent
    positions: tuple[Position, Position]

    @property
    def user_id(self) -> str:
        return self.interaction.user_id

    @property
    def request_id(self) -> str:
        return self.interaction.request_id


@dataclass
class _Pending:
    event: events_pb2.Interaction | events_pb2.FeedbackEvent
    position: Position
    arrived: float = field(default_factory=time.monotonic)


class Joiner:
    def __init__(self, wait_seconds: float) -> None:
        self.wait_seconds = wait_seconds
        self._interactions: dict[str, _Pending] = {}
        self._feedback: dict[str, _Pending] = {}
        # Offsets each partition holds in memory (pending events and unapplied samples).
        self._held: dict[tuple[str, int], set[int]] = defaultdict(set)
        self._next: dict[tuple[str, int], int] = {}
        self.duplicates = 0
        self.expired = 0
        self.mismatched = 0

    def _hold(self, pos: Position) -> None:
        topic, part, offset = pos
        self._held[(topic, part)].add(offset)
        self._next[(topic, part)] = max(self._next.get((topic, part), 0), offset + 1)

    def release(self, positions: tuple[Position, ...]) -> None:
        """Mark positions as done (applied or dropped by rule)."""
        for topic, part, offset in positions:
            self._held[(topic, part)].discard(offset)

    def seen(self, pos: Position) -> None:
        """A record that needs no holding (e.g. skipped) still advances the watermark."""
        topic, part, offset = pos
        self._next[(topic, part)] = max(self._next.get((topic, part), 0), offset + 1)

    def add_interaction(self, event: events_pb2.Interaction, pos: Position) -> Sample | None:
        return self._add(event.request_id, _Pending(event, pos), self._interactions, self._feedback)

    def add_feedback(self, event: events_pb2.FeedbackEvent, pos: Position) -> Sample | None:
        return self._add(event.request_id, _Pending(event, pos), self._feedback, self._interactions)

    def _add(
        self,
        request_id: str,
        item: _Pending,
        mine: dict[str, _Pending],
        theirs: dict[str, _Pending],
    ) -> Sample | None:
        self.seen(item.position)
        if request_id in mine:  # a duplicate delivery: keep the first
            self.duplicates += 1
            return None
        other = theirs.pop(request_id, None)
        if other is None:
            mine[request_id] = item
            self._hold(item.position)
            return None
        self._hold(item.position)
        pair = (item, other) if isinstance(item.event, events_pb2.Interaction) else (other, item)
        interaction, feedback = pair
        assert isinstance(interaction.event, events_pb2.Interaction)
        assert isinstance(feedback.event, events_pb2.FeedbackEvent)
        if interaction.event.user_id != feedback.event.user_id:
            self.mismatched += 1
            self.release((interaction.position, feedback.position))
            return None
        return Sample(interaction.event, feedback.event, (interaction.position, feedback.position))

    def expire(self, now: float | None = None) -> int:
        """Drop events that waited longer than the window for their partner."""
        now = time.monotonic() if now is None else now
        dropped = 0
        for table in (self._interactions, self._feedback):
            for rid in [r for r, p in table.items() if now - p.arrived > self.wait_seconds]:
                self.release((table.pop(rid).position,))
                dropped += 1
        self.expired += dropped
        return dropped

    def forget_user(self, user_id: str) -> None:
        for table in (self._interactions, self._feedback):
            for rid in [r for r, p in table.items() if p.event.user_id == user_id]:
                self.release((table.pop(rid).position,))

    def commit_offsets(self) -> dict[tuple[str, int], int]:
        """Per partition, the offset a consumer may commit (the next one not yet done)."""
        return {
            tp: min(self._held[tp]) if self._held.get(tp) else nxt for tp, nxt in self._next.items()
        }

    @property
    def pending(self) -> int:
        return len(self._interactions) + len(self._feedback)
