"""Where each user's newest announcement stands on `adapter-updates`.

The learner notes, per user, the version and the offset of the newest AdapterUpdated it
knows to be on the topic: those its producer had acknowledged, and at start-up those
found past the group's committed position (a predecessor's, which a tombstone not yet
processed may precede). Two decisions use it:

- re-announcing after a replay: not needed when the newest stored version is known to be
  announced already;
- answering a deletion with a tombstone of the learner's own: needed only when one of the
  user's announcements follows the server's tombstone (a greater offset on the same
  partition), since otherwise the server's tombstone is already the user's last record.

At most `capacity` users are remembered, the least recently announced forgotten first;
a forgotten user only costs a redundant re-announcement or tombstone, both harmless.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass


@dataclass(frozen=True)
class Announced:
    version: int
    partition: int
    offset: int


class Announcements:
    def __init__(self, capacity: int = 100_000) -> None:
        self.capacity = capacity
        self._by_user: OrderedDict[str, Announced] = OrderedDict()

    def note(self, user_id: str, version: int, partition: int, offset: int) -> None:
        known = self._by_user.get(user_id)
        if known is not None and (known.partition, known.offset) == (partition, offset):
            return
        if known is None or known.partition != partition or known.offset < offset:
            self._by_user[user_id] = Announced(version, partition, offset)
        self._by_user.move_to_end(user_id)
        while len(self._by_user) > self.capacity:
            self._by_user.popitem(last=False)

    def get(self, user_id: str) -> Announced | None:
        return self._by_user.get(user_id)

    def announced(self, user_id: str, version: int) -> bool:
        """True when `version` (or a newer one) of the user is known to be on the topic."""
        known = self._by_user.get(user_id)
        return known is not None and known.version >= version

    def after(self, user_id: str, partition: int, offset: int) -> bool | None:
        """Does an announcement of the user follow `offset` on `partition`? None: unknown."""
        known = self._by_user.get(user_id)
        if known is None:
            return None
        return known.partition != partition or known.offset > offset

    def discard(self, user_id: str) -> None:
        self._by_user.pop(user_id, None)

    def __contains__(self, user_id: str) -> bool:
        return user_id in self._by_user

    def __len__(self) -> int:
        return len(self._by_user)
