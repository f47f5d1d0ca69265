"""Join interactions with their feedback by request_id, whichever arrives first.

Rules (all keyed by request_id, all deterministic on replay because time is *event time*,
the newest event timestamp seen, not the wall clock):

- An interaction waits `wait_seconds` of event time for its feedback. When the window
  closes without feedback it becomes a sample with no feedback (the learner then uses the
  default reward, if one is configured) or is dropped: `expired` counts them.
- Feedback stamped more than `wait_seconds` after its interaction (both stamped by the
  server: the request's start, the Feedback call) is *late*, whenever it is consumed; so
  is feedback that arrives after its interaction's window closed. Late feedback is counted
  and dropped, because the default reward already stood in for it (as in Azure
  Personalizer: the reward wait time is a contract). The server applies the same rule to
  its answer (FeedbackResponse.accepted), from the issue time in the request id.
- Repeated feedback on one request follows `aggregation` (setting feedback_aggregation),
  as the server's answer does: "earliest" joins the first feedback at once and counts any
  later one as a duplicate; "sum" keeps the interaction until its window closes and joins
  every feedback that came within it (the learner adds their rewards). An exact copy of a
  feedback event (the same bytes: a redelivery) is a duplicate in both.
- Feedback whose interaction never shows up within the window is dropped (`orphaned`).
- A second delivery of an event already pending or already joined is a duplicate:
  counted, ignored, its offset not held; one that arrives after the join window of its
  request closed is counted `late` (the joiner no longer remembers it).
- Interaction and feedback naming different users are both dropped (`mismatched`).
- Regenerates (`pair_regenerates`, for learner/preferences.py): every interaction is
  remembered for `wait_seconds` of event time, so that a later interaction of the same
  user naming it in `regenerates` is joined with it: its sample carries the replaced
  interaction (`Sample.replaced`), and whether it was itself regenerated before its sample
  closed (`Sample.replaced_again`). One that names an interaction not remembered (too old,
  another user's, never seen) pairs with nothing (`unpaired`).

The joiner also knows, per partition, the lowest offset still held in memory: the offset
that is safe to commit, since everything before it has been applied or dropped by rule.
Holds are counted: an offset is held once by the sample it belongs to, once while its
interaction is remembered for regenerates, and once by each sample that replaced it, so a
replay after a crash reads a replaced interaction again whenever the sample pairing with it
was not applied yet.
"""

from __future__ import annotations

from collections import Counter, OrderedDict, defaultdict
from dataclasses import dataclass, field
from typing import Literal

from loraloop.core.gen.loraloop.v1 import events_pb2

Position = tuple[str, int, int]  # (topic, partition, offset)
_CLOSED_MEMORY = 100_000  # request ids remembered after joining/expiring
Aggregation = Literal["earliest", "sum"]


@dataclass
class Sample:
    """One interaction with its feedback (None: the window closed without any).

    `feedbacks` is every feedback joined (one for "earliest"; all within the window for
    "sum"), `feedback` the first of them; `positions` is the interaction's, then theirs,
    then the replaced interaction's (when `replaced` is set): releasing them releases
    everything the sample holds."""

    interaction: events_pb2.Interaction
    feedback: events_pb2.FeedbackEvent | None
    positions: tuple[Position, ...]
    feedbacks: tuple[events_pb2.FeedbackEvent, ...] = field(default=())
    # the interaction this one regenerates (Interaction.regenerates), when remembered
    replaced: events_pb2.Interaction | None = None
    # this interaction was itself regenerated before its sample closed
    replaced_again: bool = False

    def __post_init__(self) -> None:
        if not self.feedbacks and self.feedback is not None:
            self.feedbacks = (self.feedback,)

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
    held: bool = False  # its position is held (once) for the sample it will be part of


def _same_feedback(
    a: events_pb2.Interaction | events_pb2.FeedbackEvent, b: events_pb2.FeedbackEvent
) -> bool:
    """Whether `b` is a copy of feedback `a` (a redelivery): the same feedback_id, or
    without ids (older events) the same content."""
    assert isinstance(a, events_pb2.FeedbackEvent)
    if a.feedback_id or b.feedback_id:
        return a.feedback_id == b.feedback_id
    return a.SerializeToString(deterministic=True) == b.SerializeToString(deterministic=True)


class Joiner:
    def __init__(
        self,
        wait_seconds: float,
        aggregation: Aggregation = "earliest",
        pair_regenerates: bool = False,
    ) -> None:
        if aggregation not in ("earliest", "sum"):
            raise ValueError(f"aggregation={aggregation!r}: use 'earliest' or 'sum'")
        self.wait_ms = int(wait_seconds * 1000)
        self.aggregation = aggregation
        self.pair_regenerates = pair_regenerates
        self._interactions: dict[str, _Pending] = {}
        self._feedback: dict[str, _Pending] = {}  # earliest: the one feedback waiting
        self._sums: dict[str, list[_Pending]] = {}  # sum: every feedback of the window
        self._closed: OrderedDict[str, str] = OrderedDict()  # request_id -> "joined"/"expired"
        self._held: dict[tuple[str, int], Counter[int]] = defaultdict(Counter)
        self._next: dict[tuple[str, int], int] = {}
        # pair_regenerates: interactions remembered for their window, oldest first; the
        # replaced interaction of each pending one that regenerates it; ids regenerated
        self._recent: OrderedDict[str, _Pending] = OrderedDict()
        self._links: dict[str, _Pending] = {}
        self._regenerated: OrderedDict[str, None] = OrderedDict()
        self.stream_time_ms = 0
        self.duplicates = 0
        self.expired = 0
        self.late = 0
        self.orphaned = 0
        self.mismatched = 0
        self.unpaired = 0  # regenerates naming an interaction not remembered

    # --- offsets ------------------------------------------------------------------------
    def _hold(self, pos: Position) -> None:
        self._held[(pos[0], pos[1])][pos[2]] += 1

    def _hold_item(self, item: _Pending) -> None:
        if not item.held:
            item.held = True
            self._hold(item.position)

    def release(self, positions: tuple[Position, ...]) -> None:
        """Mark positions as done (applied or dropped by rule): each releases one hold."""
        for topic, part, offset in positions:
            held = self._held[(topic, part)]
            if held[offset] > 1:
                held[offset] -= 1
            else:
                held.pop(offset, None)

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

    def is_late(self, interaction_ms: int, feedback_ms: int) -> bool:
        """Feedback stamped past its interaction's window (both must be stamped)."""
        return (
            interaction_ms > 0 and feedback_ms > 0 and feedback_ms - interaction_ms > self.wait_ms
        )

    def _drop_late(self, item: _Pending) -> None:
        self.late += 1
        self.release((item.position,))

    # --- regenerates --------------------------------------------------------------------
    def _remember(self, item: _Pending) -> None:
        """Keep an interaction (and a hold on its offset) for its window, for the
        interactions that may regenerate it."""
        assert isinstance(item.event, events_pb2.Interaction)
        before = self._recent.pop(item.event.request_id, None)  # a copy the joiner forgot
        if before is not None:
            self.release((before.position,))
        self._recent[item.event.request_id] = item
        self._hold(item.position)
        while len(self._recent) > _CLOSED_MEMORY:
            self.release((self._recent.popitem(last=False)[1].position,))

    def _link(self, event: events_pb2.Interaction) -> None:
        """Join an interaction with the one it regenerates, which its sample then holds."""
        replaced_id = event.regenerates
        if not replaced_id or replaced_id == event.request_id:
            return
        self._regenerated[replaced_id] = None
        while len(self._regenerated) > _CLOSED_MEMORY:
            self._regenerated.popitem(last=False)
        replaced = self._recent.get(replaced_id)
        if (
            replaced is None
            or replaced.event.user_id != event.user_id
            or self.is_late(replaced.event.timestamp_ms, event.timestamp_ms)
        ):
            self.unpaired += 1
            return
        self._hold(replaced.position)
        self._links[event.request_id] = replaced

    def _sample(
        self,
        inter: _Pending,
        feedbacks: tuple[events_pb2.FeedbackEvent, ...],
        positions: tuple[Position, ...],
    ) -> Sample:
        """The interaction's sample, with the interaction it replaced (whose hold it takes)."""
        assert isinstance(inter.event, events_pb2.Interaction)
        rid = inter.event.request_id
        linked = self._links.pop(rid, None)
        replaced = None
        if linked is not None:
            assert isinstance(linked.event, events_pb2.Interaction)
            replaced = linked.event
            positions = (*positions, linked.position)
        feedback = feedbacks[0] if feedbacks else None
        again = rid in self._regenerated
        return Sample(inter.event, feedback, positions, feedbacks, replaced, again)

    def add_interaction(self, event: events_pb2.Interaction, pos: Position) -> Sample | None:
        self.seen(pos)
        self._tick(event.timestamp_ms)
        rid = event.request_id
        if rid in self._interactions or rid in self._closed:
            self.duplicates += 1
            return None
        item = _Pending(event, pos)
        if self.pair_regenerates:
            self._remember(_Pending(event, pos))
            self._link(event)
        if self.aggregation == "sum":
            waiting = self._sums.pop(rid, [])
            kept = [
                f for f in waiting if not self.is_late(event.timestamp_ms, f.event.timestamp_ms)
            ]
            for f in waiting:
                if f not in kept:
                    self._drop_late(f)
            if kept:
                self._sums[rid] = kept
            self._interactions[rid] = item
            self._hold_item(item)
            return None
        fb = self._feedback.pop(rid, None)
        if fb is not None and self.is_late(event.timestamp_ms, fb.event.timestamp_ms):
            self._drop_late(fb)
            fb = None
        if fb is None:
            self._interactions[rid] = item
            self._hold_item(item)
            return None
        return self._join(item, fb)

    def add_feedback(self, event: events_pb2.FeedbackEvent, pos: Position) -> Sample | None:
        self.seen(pos)
        self._tick(event.timestamp_ms)
        rid = event.request_id
        closed = self._closed.get(rid)
        if closed == "expired" or (closed == "joined" and self.aggregation == "sum"):
            self.late += 1
            return None
        inter = self._interactions.get(rid)
        if inter is not None and self.is_late(inter.event.timestamp_ms, event.timestamp_ms):
            self.late += 1
            return None
        item = _Pending(event, pos)
        if self.aggregation == "sum":
            waiting = self._sums.setdefault(rid, [])
            if any(_same_feedback(f.event, event) for f in waiting):
                self.duplicates += 1
                return None
            waiting.append(item)
            self._hold_item(item)
            return None
        if closed is not None or rid in self._feedback:
            self.duplicates += 1
            return None
        self._interactions.pop(rid, None)
        if inter is None:
            self._feedback[rid] = item
            self._hold_item(item)
            return None
        return self._join(inter, item)

    def _join(self, inter: _Pending, *fbs: _Pending) -> Sample | None:
        assert isinstance(inter.event, events_pb2.Interaction)
        self._close(inter.event.request_id, "joined")
        self._hold_item(inter)
        feedbacks = []
        for fb in fbs:
            assert isinstance(fb.event, events_pb2.FeedbackEvent)
            self._hold_item(fb)
            feedbacks.append(fb.event)
        sample = self._sample(inter, tuple(feedbacks), (inter.position, *(f.position for f in fbs)))
        if any(f.user_id != inter.event.user_id for f in feedbacks):
            self.mismatched += 1
            self.release(sample.positions)
            return None
        return sample

    def expire(self, now_ms: int | None = None) -> list[Sample]:
        """Close windows older than `wait_seconds` of event time (default: stream time).

        Returns the interactions that closed without feedback, as samples whose
        feedback is None, and ("sum") those whose window closed with feedback, as joined
        samples (their offsets stay held until the learner releases them).
        """
        now = self.stream_time_ms if now_ms is None else now_ms
        horizon = now - self.wait_ms
        unanswered = []
        for rid in [r for r, p in self._interactions.items() if p.event.timestamp_ms < horizon]:
            item = self._interactions.pop(rid)
            assert isinstance(item.event, events_pb2.Interaction)
            fbs = self._sums.pop(rid, [])
            if fbs:
                sample = self._join(item, *fbs)
                if sample is not None:
                    unanswered.append(sample)
                continue
            self._close(rid, "expired")
            self.expired += 1
            unanswered.append(self._sample(item, (), (item.position,)))
        for rid in [r for r, p in self._feedback.items() if p.event.timestamp_ms < horizon]:
            self.release((self._feedback.pop(rid).position,))
            self.orphaned += 1
        for rid in [r for r in self._sums if r not in self._interactions]:
            waiting = self._sums[rid]
            for item in [f for f in waiting if f.event.timestamp_ms < horizon]:
                waiting.remove(item)
                self.release((item.position,))
                self.orphaned += 1
            if not waiting:
                del self._sums[rid]
        while self._recent:  # oldest first: windows close in about arrival order
            oldest = next(iter(self._recent.values()))
            if oldest.event.timestamp_ms >= horizon:
                break
            self.release((self._recent.popitem(last=False)[1].position,))
        return unanswered

    def forget_user(self, user_id: str) -> None:
        for table in (self._interactions, self._feedback, self._recent, self._links):
            for rid in [r for r, p in table.items() if p.event.user_id == user_id]:
                self.release((table.pop(rid).position,))
        for rid in list(self._sums):
            mine = [f for f in self._sums[rid] if f.event.user_id == user_id]
            self.release(tuple(f.position for f in mine))
            self._sums[rid] = [f for f in self._sums[rid] if f not in mine]
            if not self._sums[rid]:
                del self._sums[rid]

    @property
    def pending(self) -> int:
        waiting = sum(len(fbs) for fbs in self._sums.values())
        return len(self._interactions) + len(self._feedback) + waiting

    def counters(self) -> dict[str, int]:
        return {
            "duplicates": self.duplicates,
            "expired": self.expired,
            "late": self.late,
            "orphaned": self.orphaned,
            "mismatched": self.mismatched,
            "unpaired": self.unpaired,
            "pending": self.pending,
        }
