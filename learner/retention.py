"""The learner's part of adapter retention: it knows when each of its announcements was
acknowledged, hence each user's serving floor, and deletes what the rule of
loraloop/core/adapters/retention.py lets go.

- `acknowledged(user, version)` is called when Kafka has acknowledged an AdapterUpdated
  (the time taken is when the learner saw the acknowledgement, never earlier than the
  broker gave it, so the grace is never cut short).
- `ripe()` returns the users whose floor rose since the last call: the newest version
  acknowledged at least `grace_s` ago. A restarted learner knows no acknowledgement of its
  predecessor, so it deletes nothing before its own announcements are `grace_s` old.
- `prune(user)` deletes the user's versions below the floor, except the newest
  `keep_newest` and the rollback guard's targets named by the versions it keeps.

At most `capacity` users' floors are remembered (the least recently raised forgotten
first); a forgotten floor only delays deletions until the user's next announcement ripens.
"""

from __future__ import annotations

import time
from collections import OrderedDict, deque
from collections.abc import Callable

from loraloop.core.adapters.protocol import VersionStore
from loraloop.core.adapters.retention import retired_versions
from loraloop.core.adapters.store import AdapterStoreError


class Retention:
    def __init__(
        self,
        store: VersionStore,
        keep_newest: int,
        grace_s: float,
        clock: Callable[[], float] = time.monotonic,
        capacity: int = 100_000,
    ) -> None:
        self.store = store
        self.keep_newest = keep_newest
        self.grace_s = grace_s
        self.clock = clock
        self.capacity = capacity
        self._acked: deque[tuple[float, str, int]] = deque()  # in acknowledgement order
        self._floor: OrderedDict[str, int] = OrderedDict()
        self._due: set[str] = set()

    @property
    def enabled(self) -> bool:
        return self.keep_newest > 0

    def acknowledged(self, user_id: str, version: int) -> None:
        if self.enabled:
            self._acked.append((self.clock(), user_id, version))

    def floor(self, user_id: str) -> int:
        """The newest version of the user acknowledged at least grace_s ago (0: none)."""
        return self._floor.get(user_id, 0)

    def ripe(self) -> set[str]:
        """Users whose floor rose since the last call (each to prune once)."""
        horizon = self.clock() - self.grace_s
        while self._acked and self._acked[0][0] <= horizon:
            _, user_id, version = self._acked.popleft()
            if version > self._floor.get(user_id, 0):
                self._floor[user_id] = version
                self._floor.move_to_end(user_id)
                self._due.add(user_id)
        while len(self._floor) > self.capacity:
            forgotten, _ = self._floor.popitem(last=False)
            self._due.discard(forgotten)
        due, self._due = self._due, set()
        return due

    def prune(self, user_id: str) -> list[int]:
        """Delete what the rule lets go of this user's versions; the versions deleted.
        Raises OSError (or AdapterStoreError) when the store fails to delete."""
        versions = self.store.versions(user_id)
        floor = self.floor(user_id)
        candidates = set(retired_versions(versions, self.keep_newest, floor))
        if not candidates:
            return []  # nothing to delete even unprotected: no learner state read
        kept = [v for v in versions if v not in candidates]
        protected = self._rollback_targets(user_id, kept)
        return self.store.retire(
            user_id, retired_versions(versions, self.keep_newest, floor, protected)
        )

    def _rollback_targets(self, user_id: str, kept: list[int]) -> set[int]:
        """The versions the rollback guard may return to: `best_version` in the learner
        state of each kept version (the learner learns on from one of them). A version
        whose state does not read is never loaded, so it names no target."""
        targets = set()
        for version in kept:
            try:
                guard = self.store.learner_state(user_id, version).get("guard") or {}
            except AdapterStoreError:
                continue
            if isinstance(guard, dict):
                targets.add(int(guard.get("best_version") or 0))
        return targets

    def forget(self, user_id: str) -> None:
        """A deleted user: their versions are gone, and a new v1 starts afresh."""
        self._floor.pop(user_id, None)
        self._due.discard(user_id)
        if any(u == user_id for _, u, _ in self._acked):
            self._acked = deque(item for item in self._acked if item[1] != user_id)
