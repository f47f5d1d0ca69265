"""Deleted users: events from before a user's deletion are never learnt from.

A tombstone on `adapter-updates` deletes a user, but events produced before it (on the
other topics, or still in a server's queue) may be consumed after it, and would bring the
user's adapter back. The learner remembers when each user was deleted and drops such
events. Only the user id and one timestamp are kept, for at most `capacity` users.
"""

from __future__ import annotations

from collections import OrderedDict


class DeletedUsers:
    def __init__(self, capacity: int = 100_000) -> None:
        self.capacity = capacity
        self._at: OrderedDict[str, int] = OrderedDict()  # user_id -> deletion time (ms)

    def record(self, user_id: str, timestamp_ms: int) -> None:
        self._at[user_id] = max(timestamp_ms, self._at.get(user_id, 0))
        self._at.move_to_end(user_id)
        while len(self._at) > self.capacity:
            self._at.popitem(last=False)

    def predates_deletion(self, user_id: str, timestamp_ms: int) -> bool:
        """True for an event of `user_id` stamped at or before the user's deletion."""
        deleted_at = self._at.get(user_id)
        return deleted_at is not None and timestamp_ms <= deleted_at

    def __contains__(self, user_id: str) -> bool:
        return user_id in self._at
