"""Join interactions with their feedback by request_id, whichever arrives first.

Rules (all keyed by request_id, all deterministic on replay because time is *event time*,
the newest event timestamp seen, not the wall clock):

- An interaction waits `wait_seconds` of event time for its feedback. When the window
  closes without feedback it becomes a sample with no feedback (the learner then uses the
  default reward, if one is configured) or is dropped: `expired` counts them.
- Feedback that arrives after its interaction's window closed is *late*: it is counted
  and dropped, because the default reward already stood in for it (as in Azure
  Personalizer: the reward wait time is a contract).
- Feedback whose interaction never shows up within the window is dropped (`orphaned`).
- A second delivery of an event already pending or already joined is a duplicate:
  counted, ignored, its offset not held.
- Interaction and feedback naming different users are both dropped (`mismatched`).

The joiner also knows, per partition, the lowest offset still held in memory: the offset
that is safe to commit, since everything before it has been applied or dropped by rule.
"""

from __future__ import annotations

from collections import OrderedDict, defaultdict
from dataclasses import dataclass

from loraloop.core.gen.loraloop.v1 import events_pb2

Position = tuple[str, int, int]  # (topic, partition, offset)
_CLOSED_MEMORY = 100_000  # request ids remembered after joining/expiring


@dataclass
class Sample:
    """One interaction with its feedback (None: the window closed without any)."""

    interaction: events_pb2.Interaction
    feedback: events_pb2.FeedbackEvent | None
    positions: tuple[Position, ...]

    @property
    def user_id(self) -> str:
        return self.interaction.user_id

    @property
    def request_id(self) -> str:
        return self.interaction.request_id

    @property
    def interaction_position(self) -> Position:
        """Where the interaction was read: the sample's identity in the stream."""
        return self.positions[0]


@dataclass
class _Pending:
    event: events_pb2.Interaction | events_pb2.FeedbackEvent
    position: Position


class Joiner:
    def __init__(self, wait_seconds: float) -> None:
        self.wait_ms = int(wait_seconds * 1000)
        self._interactions: dict[str, _Pending] = {}
        self._feedback: dict[str, _Pending] = {}
        self._closed: OrderedDict[str, str] = OrderedDict()  # request_id -> "joined"/"expired"
        self._held: dict[tuple[str, int], set[int]] = defaultdict(set)
        self._next: dict[tuple[str, int], int] = {}
        self.stream_time_ms = 0
        self.duplicates = 0
        self.expired = 0
        self.late = 0
        self.orphaned = 0
        self.mismatched = 0

    # --- offsets ------------------------------------------------------------------------
    def _hold(self, pos: Position) -> None:
        self._held[(pos[0], pos[1])].add(pos[2])

    def release(self, positions: tuple[Position, ...]) -> None:
        """Mark positions as done (applied or dropped by rule)."""
        for topic, part, offset in positions:
            self._held[(topic, part)].discard(offset)

    def seen(self, pos: Position) -> None:
        """Every consumed record advances its partition's watermark."""
        topic, part, offset = pos
        self._next[(topic, part)] = max(self._next.get((topic, part), 0), offset + 1)

    def commit_offsets(self) -> dict[tuple[str, int], int]:
        """Per partition, the offset a consumer may commit (the next one not yet done)."""
        return {
            tp: min(self._held[tp]) if self._held.get(tp) else nxt for tp, nxt in self._next.items()
        }

    # --- joining ------------------------------------------------------------------------
    def _close(self, request_id: str, why: str) -> None:
        self._closed[request_id] = why
        while len(self._closed) > _CLOSED_MEMORY:
            self._closed.popitem(last=False)

    def _tick(self, timestamp_ms: int) -> None:
        self.stream_time_ms = max(self.stream_time_ms, timestamp_ms)

    def add_interaction(self, event: events_pb2.Interaction, pos: Position) -> Sample | None:
        self.seen(pos)
        self._tick(event.timestamp_ms)
        rid = event.request_id
        if rid in self._interactions or rid in self._closed:
            self.duplicates += 1
            return None
        item = _Pending(event, pos)
        fb = self._feedback.pop(rid, None)
        if fb is None:
            self._interactions[rid] = item
            self._hold(pos)
            return None
        return self._join(item, fb)

    def add_feedback(self, event: events_pb2.FeedbackEvent, pos: Position) -> Sample | None:
        self.seen(pos)
        self._tick(event.timestamp_ms)
        rid = event.request_id
        closed = self._closed.get(rid)
        if closed == "expired":
            self.late += 1
            return None
        if closed is not None or rid in self._feedback:
            self.duplicates += 1
            return None
        item = _Pending(event, pos)
        inter = self._interactions.pop(rid, None)
        if inter is None:
            self._feedback[rid] = item
            self._hold(pos)
            return None
        return self._join(inter, item)

    def _join(self, inter: _Pending, fb: _Pending) -> Sample | None:
        assert isinstance(inter.event, events_pb2.Interaction)
        assert isinstance(fb.event, events_pb2.FeedbackEvent)
        self._close(inter.event.request_id, "joined")
        self._hold(inter.position)
        self._hold(fb.position)
        if inter.event.user_id != fb.event.user_id:
            self.mismatched += 1
            self.release((inter.position, fb.position))
            return None
        return Sample(inter.event, fb.event, (inter.position, fb.position))

    def expire(self, now_ms: int | None = None) -> list[Sample]:
        """Close windows older than `wait_seconds` of event time (default: stream time).

        Returns the interactions that closed without feedback, as samples whose
        feedback is None (their offsets stay held until the learner releases them).
        """
        now = self.stream_time_ms if now_ms is None else now_ms
        horizon = now - self.wait_ms
        unanswered = []
        for rid in [r for r, p in self._interactions.items() if p.event.timestamp_ms < horizon]:
            item = self._interactions.pop(rid)
            assert isinstance(item.event, events_pb2.Interaction)
            self._close(rid, "expired")
            self.expired += 1
            unanswered.append(Sample(item.event, None, (item.position,)))
        for rid in [r for r, p in self._feedback.items() if p.event.timestamp_ms < horizon]:
            self.release((self._feedback.pop(rid).position,))
            self.orphaned += 1
        return unanswered

    def forget_user(self, user_id: str) -> None:
        for table in (self._interactions, self._feedback):
            for rid in [r for r, p in table.items() if p.event.user_id == user_id]:
                self.release((table.pop(rid).position,))

    @property
    def pending(self) -> int:
        return len(self._interactions) + len(self._feedback)

    def counters(self) -> dict[str, int]:
        return {
            "duplicates": self.duplicates,
            "expired": self.expired,
            "late": self.late,
            "orphaned": self.orphaned,
            "mismatched": self.mismatched,
            "pending": self.pending,
        }
