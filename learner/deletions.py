"""Deleted users: events from before a user's deletion are never learnt from.

A tombstone on `adapter-updates` deletes a user, but events produced before it (on the
other topics, still in a server's queue or spill journal, or replayed after a learner
restart) may be consumed after it, and would bring the user's adapter back. The learner
remembers when each user was deleted and drops every event of theirs stamped at or before
that time (an interaction is stamped with its request's start, so a generation that was
running when the user was deleted is dropped too).

The memory is rebuilt at start-up from the tombstones still on the compacted topic (a
tombstone's record timestamp is the deletion time), so a restarted learner knows every
deletion its predecessor knew. Only the user id and one timestamp are kept, for at most
`capacity` users: beyond that the oldest deletion is forgotten first, at run time and when
rebuilding alike (its pre-deletion events are the oldest, the most likely to be consumed
already); each forgotten deletion is counted and logged.

The learner's own tombstones (sent when one of its versions was announced after the
server's tombstone, so the tombstone keeps the last word on the compacted topic) carry
`ORIGIN_HEADER: learner` and the deletion time they answer: the learner ignores them when
it consumes them, so they neither delete the user again nor move the deletion time.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Iterable
from typing import Any

log = logging.getLogger(__name__)

ORIGIN_HEADER = "loraloop.origin"
LEARNER_ORIGIN = b"learner"
DELETED_AT_HEADER = "loraloop.deleted_at"  # the deletion time (ms) a learner tombstone answers


def learner_tombstone_headers(deleted_at_ms: int) -> list[tuple[str, bytes]]:
    """Headers of a tombstone the learner sends itself."""
    return [(ORIGIN_HEADER, LEARNER_ORIGIN), (DELETED_AT_HEADER, str(deleted_at_ms).encode())]


def _header(record: Any, name: str) -> bytes | None:
    for key, value in getattr(record, "headers", None) or ():
        if key == name:
            return value
    return None


def from_learner(record: Any) -> bool:
    """True for a record a learner sent (its own tombstones)."""
    return _header(record, ORIGIN_HEADER) == LEARNER_ORIGIN


def deletion_time(record: Any) -> int:
    """When a tombstone record says its user was deleted (ms since the epoch)."""
    stated = _header(record, DELETED_AT_HEADER)
    if stated is not None:
        try:
            return int(stated)
        except ValueError:
            pass
    return int(record.timestamp or 0)


class DeletedUsers:
    def __init__(self, capacity: int = 100_000) -> None:
        self.capacity = capacity
        self.forgotten = 0  # deletions dropped to stay within capacity
        self._at: OrderedDict[str, int] = OrderedDict()  # user_id -> deletion time, oldest first

    def record(self, user_id: str, timestamp_ms: int) -> None:
        at = max(timestamp_ms, self._at.get(user_id, 0))
        self._at[user_id] = at
        self._at.move_to_end(user_id)
        # kept in deletion-time order, so the oldest deletion is the one forgotten first
        self._reorder_last(user_id, at)
        while len(self._at) > self.capacity:
            gone, when = self._at.popitem(last=False)
            self.forgotten += 1
            if self.forgotten == 1 or self.forgotten % 10_000 == 0:
                log.warning(
                    "more than %d deleted users: forgot the oldest deletions (%d so far, "
                    "latest %s deleted at %d ms); their pre-deletion events would no longer "
                    "be dropped",
                    self.capacity,
                    self.forgotten,
                    gone,
                    when,
                )

    def _reorder_last(self, user_id: str, at: int) -> None:
        """Move the just-recorded entry back past newer deletions (rare: a tombstone
        stamped earlier than one already recorded)."""
        newer = []
        for other in reversed(self._at):
            if other == user_id:
                continue
            if self._at[other] <= at:
                break
            newer.append(other)
        for other in reversed(newer):
            self._at.move_to_end(other)

    def rebuild(self, deletions: Iterable[tuple[str, int]]) -> None:
        """Record deletions read back from the compacted topic (any order)."""
        for user_id, at in sorted(deletions, key=lambda item: item[1]):
            self.record(user_id, at)

    def deleted_at(self, user_id: str) -> int | None:
        return self._at.get(user_id)

    def predates_deletion(self, user_id: str, timestamp_ms: int) -> bool:
        """True for an event of `user_id` stamped at or before the user's deletion."""
        deleted_at = self._at.get(user_id)
        return deleted_at is not None and timestamp_ms <= deleted_at

    def __contains__(self, user_id: str) -> bool:
        return user_id in self._at

    def __len__(self) -> int:
        return len(self._at)
