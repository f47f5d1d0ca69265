"""The newest adapter version of every user, as this server knows it.

A background thread reads the compacted `adapter-updates` topic from the beginning (so a
restarted server rebuilds its view) and then follows it; the first time a user is served,
the adapter store is listed as well, because a learner killed between writing a version
and announcing it leaves the store ahead of the topic (and this server may have served
that version before it restarted). Versions only ever go up: a stale or replayed event
never makes a user's responses older. A tombstone forgets the user.

The one exception is a version that does not load: `reject` marks it unservable here,
logs and counts it, and the user is served the newest older version that is not rejected
(or the base model). An integrity error (truncated, corrupt, failing its checksum) rejects
the version for good, until a newer one comes; a transient one (an OSError such as EMFILE
or EIO, the engine refusing the adapter for now) only for `retry_s` seconds, after which
the version is served (and so tried) again. A deletion forgets the user's rejections.

A version for another base model is rejected for good too (kind "integrity"), before it is
ever loaded: when its AdapterUpdated names another `base_model_id`, when its
`adapter_config.json` names another `base_model_name_or_path` (for versions the store
listing finds), or when the checksum the announcement carries is not the one the store
recorded for its weights (the files are not the version that was announced). Empty ids
and checksums are not checked.

The registry also remembers when users were deleted (the timestamp of their tombstones,
and this server's own DeleteUser calls), bounded to the most recent DELETIONS_REMEMBERED,
so Feedback can tell that a response predates its user's deletion.
"""

from __future__ import annotations

import json
import logging
import math
import threading
import time
from collections import OrderedDict
from collections.abc import Callable

from loraloop.core.adapters.protocol import VersionStore
from loraloop.core.adapters.version import ADAPTER_CONFIG, AdapterVersion, expected_checksum
from loraloop.core.gen.loraloop.v1 import events_pb2
from loraloop.core.kafka.follow import TopicFollower

log = logging.getLogger(__name__)
RETRY_BACKOFF_MAX = 16  # the pause doubles per failure of the same version, up to 16x
RETRY_TRANSIENT_S = 30.0  # a version that failed to load for a passing reason is tried again
DELETIONS_REMEMBERED = 100_000  # users whose deletion time the registry keeps


class AdapterRegistry:
    def __init__(
        self,
        store: VersionStore,
        bootstrap: str,
        topic: str,
        on_delete: Callable[[str], None] | None = None,
        retry_s: float = RETRY_TRANSIENT_S,
        model_id: str = "",
    ) -> None:
        self._store = store
        self.model_id = model_id  # the base model served: versions for another are rejected
        self._on_delete = on_delete
        self._lock = threading.Lock()
        self._latest: dict[str, AdapterVersion | None] = {}
        self._checked: set[str] = set()  # users whose store directory was listed
        self.retry_s = retry_s
        # versions that failed to load -> when they may be tried again (inf: never)
        self._rejected: dict[tuple[str, int], float] = {}
        self._failures: dict[tuple[str, int], int] = {}  # transient failures in a row
        # user -> newest version rejected for a transient reason, to restore when it is due
        self._retry: dict[str, AdapterVersion] = {}
        self.floor_catch_ups = 0  # versions found in the store for a client's floor
        self.rejected = 0  # rejections (a version rejected again after its retry counts again)
        self.transient_rejections = 0
        self._published_at: dict[tuple[str, int], float] = {}
        self._deleted_at: OrderedDict[str, int] = OrderedDict()  # user -> deletion time (ms)
        self._follower = TopicFollower(bootstrap, [topic], self._on_record, "adapter-updates")
        # Metrics hook: (user_id, version, published_s, live) for every version applied;
        # live = published while we were following (not replayed at start-up).
        self.on_applied: Callable[[str, int, float, bool], None] | None = None

    def start(self) -> None:
        self._follower.start()

    def stop(self) -> None:
        self._follower.stop()

    def fetch(self, ref: AdapterVersion) -> AdapterVersion:
        """Make `ref` readable at its path (a remote store downloads it into this host's
        copy, checksums verified). Blocks on the network: call it off the event loop.

        Raises AdapterStoreError (an integrity error) or OSError (the store unreachable)."""
        return self._store.fetch(ref)

    @property
    def local(self) -> bool:
        """True when every version is readable without `fetch`."""
        return self._store.is_local

    @property
    def caught_up(self) -> threading.Event:
        """Set once every update that existed at start-up has been applied."""
        return self._follower.caught_up

    @property
    def updates_seen(self) -> int:
        return self._follower.records

    def resolve(self, user_id: str) -> AdapterVersion | None:
        """The version to serve `user_id` with (None: the base model)."""
        with self._lock:
            if user_id in self._checked:
                self._restore_due(user_id)
                return self._latest.get(user_id)
        stored = self._newest_stored(user_id)  # one directory listing per user and start
        with self._lock:
            if user_id not in self._checked:  # a tombstone meanwhile wins
                self._checked.add(user_id)
                current = self._latest.get(user_id)
                if stored is not None and (current is None or stored.version > current.version):
                    self._latest[user_id] = stored
            return self._latest.get(user_id)

    def catch_up(self, user_id: str, floor: int) -> AdapterVersion | None:
        """`resolve`, for a client that has been served version `floor` (by another replica):
        when this server's view is older, it lists the store for a newer complete version
        (the announcement is on its way here, the store has it already). A deleted user is
        never looked up this way: the client's floor predates the deletion. Lists the
        store: call it off the event loop."""
        current = self.resolve(user_id)
        if (current.version if current else 0) >= floor:
            return current
        with self._lock:
            if user_id in self._deleted_at:
                return current
        stored = self._newest_stored(user_id)
        with self._lock:
            if user_id in self._deleted_at:
                return self._latest.get(user_id)
            current = self._latest.get(user_id)
            if stored is not None and (current is None or stored.version > current.version):
                self._latest[user_id] = current = stored
                self.floor_catch_ups += 1
            return current

    def known(self, user_id: str) -> bool:
        """True when `resolve(user_id)` answers from memory (no store listing)."""
        with self._lock:
            return user_id in self._checked

    def rejections_held(self, user_id: str) -> int:
        """How many versions of `user_id` are rejected here now (permanently or not yet due)."""
        with self._lock:
            return sum(1 for key in list(self._rejected) if key[0] == user_id)

    def _blocked(self, key: tuple[str, int]) -> bool:
        """True while `key` is rejected (call with the lock held); a due retry is lifted."""
        until = self._rejected.get(key)
        if until is None:
            return False
        if until <= time.monotonic():
            del self._rejected[key]
            return False
        return True

    def _restore_due(self, user_id: str) -> None:
        """Serve a transiently rejected version again once its retry is due (lock held)."""
        ref = self._retry.get(user_id)
        if ref is None or self._blocked((user_id, ref.version)):
            return
        del self._retry[user_id]
        current = self._latest.get(user_id)
        if current is None or current.version < ref.version:
            self._latest[user_id] = ref
            log.info(
                "adapter %s v%d: trying it again after a transient failure", user_id, ref.version
            )

    def _newest_stored(self, user_id: str, below: int | None = None) -> AdapterVersion | None:
        """The newest complete version in the store (below `below`) not rejected here."""
        for version in reversed(self._store.versions(user_id)):
            if below is not None and version >= below:
                continue
            with self._lock:
                if self._blocked((user_id, version)):
                    continue
            ref = self._store.ref(user_id, version)
            problem = self._foreign(ref)
            if problem is not None:
                self._mark_rejected(ref, problem, transient=False)
                continue
            return ref
        return None

    def _foreign(
        self, ref: AdapterVersion, event: events_pb2.AdapterUpdated | None = None
    ) -> str | None:
        """Why `ref` is not an adapter of this server's base model (or, with the event that
        announced it, not the version announced), or None."""
        if event is not None:
            if self.model_id and event.base_model_id and event.base_model_id != self.model_id:
                return (
                    f"announced for base model {event.base_model_id[:200]!r}, this server "
                    f"serves {self.model_id!r}"
                )
            recorded = expected_checksum(ref.path)
            if event.checksum and recorded is not None and event.checksum != recorded:
                return (
                    f"announced with checksum {event.checksum[:64]!r}, the store recorded "
                    f"{recorded!r}: not the version announced"
                )
            if event.base_model_id:
                return None  # the learner writes the same id into adapter_config.json
        if not self.model_id:
            return None
        try:
            config = json.loads((ref.path / ADAPTER_CONFIG).read_text())
        except (OSError, ValueError):
            return None  # not for this check to judge: loading it will say what is wrong
        base = config.get("base_model_name_or_path") if isinstance(config, dict) else None
        if isinstance(base, str) and base and base != self.model_id:
            return (
                f"{ADAPTER_CONFIG} names base model {base[:200]!r}, this server serves "
                f"{self.model_id!r}"
            )
        return None

    def reject(
        self, ref: AdapterVersion, error: str, transient: bool = False
    ) -> AdapterVersion | None:
        """`ref` failed to load: do not serve it here (for good, or for `retry_s` seconds
        when `transient`), and return what to serve instead (the newest older version not
        rejected, or None: the base model). Lists the store: call it off the event loop."""
        self._mark_rejected(ref, error, transient)
        older = self._newest_stored(ref.user_id, below=ref.version)
        with self._lock:
            current = self._latest.get(ref.user_id)
            if current is not None and current.version == ref.version:
                self._latest[ref.user_id] = current = older
            if current is not None and self._blocked((ref.user_id, current.version)):
                return older  # (a race with another rejection: take the safe one)
            return current  # the fallback, a newer version that came meanwhile, or None

    def _mark_rejected(self, ref: AdapterVersion, error: str, transient: bool) -> None:
        """Mark `ref` unservable here (for good, or for a while when `transient`), count
        and log it."""
        key = (ref.user_id, ref.version)
        with self._lock:
            first = not self._blocked(key)
            if transient:
                failures = self._failures[key] = self._failures.get(key, 0) + first
                self._rejected[key] = max(self._rejected.get(key, 0.0), self._retry_at(failures))
                retry = self._retry.get(ref.user_id)
                if retry is None or retry.version < ref.version:
                    self._retry[ref.user_id] = ref
            else:
                self._rejected[key] = math.inf
                if (retry := self._retry.get(ref.user_id)) and retry.version == ref.version:
                    del self._retry[ref.user_id]
            self.rejected += first
            self.transient_rejections += first and transient
            pause = self._rejected[key] - time.monotonic()
        if first and transient:
            log.warning(
                "adapter %s v%d failed to load (%s): serving an older version, retrying it "
                "in %.0fs",
                ref.user_id,
                ref.version,
                error,
                pause,
            )
        elif first:
            log.error(
                "adapter %s v%d cannot be served (%s): serving an older version instead",
                ref.user_id,
                ref.version,
                error,
            )

    def _retry_at(self, failures: int) -> float:
        """When a version that failed `failures` times in a row may be tried again: the
        pause doubles each time (a version that never loads costs a try per 8 minutes)."""
        return time.monotonic() + self.retry_s * min(2 ** (failures - 1), RETRY_BACKOFF_MAX)

    def apply(self, user_id: str, event: events_pb2.AdapterUpdated | None) -> bool:
        """Apply one update (None = tombstone); True when it changed the served version."""
        if event is None:
            self.forget(user_id)
            self.release(user_id)
            return True
        # The event's URI must name exactly the store's copy of this user's announced
        # version: an event can never make the server read files from anywhere else
        # (another version, a temporary directory, another store). ValueError otherwise,
        # and for a bad user id or a version below 1.
        self._store.path_for_uri(event.uri, user_id, event.version)
        ref = self._store.ref(user_id, event.version)
        with self._lock:
            current = self._latest.get(user_id)
            if current is not None and current.version >= ref.version:
                return False
            if self._blocked((user_id, ref.version)):
                return False  # announced again (a learner's replay): still unservable
        problem = self._foreign(ref, event)
        if problem is not None:
            self.reject(ref, problem)
            return False
        with self._lock:
            current = self._latest.get(user_id)
            if current is not None and current.version >= ref.version:
                return False
            if self._blocked((user_id, ref.version)):
                return False
            self._latest[user_id] = ref
            self._published_at[(user_id, ref.version)] = event.timestamp_ms / 1000
        if self.on_applied is not None:
            self.on_applied(
                user_id, ref.version, event.timestamp_ms / 1000, self.caught_up.is_set()
            )
        return True

    def release(self, user_id: str) -> None:
        """Tell the rest of the process a user is deleted (the `on_delete` hook: engine
        slots and host cache, bandit state, metrics); it may wait for the engine's slot
        lock, so call it off the event loop."""
        if self._on_delete:
            self._on_delete(user_id)

    def forget(self, user_id: str) -> None:
        """Serve the base model to a deleted user, without consulting the store (the
        learner may not have removed the old versions yet); a new version re-enters."""
        with self._lock:
            self._latest[user_id] = None
            self._checked.add(user_id)
            self._retry.pop(user_id, None)
            for key in [k for k in self._rejected if k[0] == user_id]:
                del self._rejected[key]  # a new v1 after the deletion is a different adapter
            for key in [k for k in self._failures if k[0] == user_id]:
                del self._failures[key]
            for key in [k for k in self._published_at if k[0] == user_id]:
                del self._published_at[key]

    def note_deletion(self, user_id: str, deleted_at_ms: int) -> None:
        """Remember when `user_id` was deleted (the latest deletion wins)."""
        with self._lock:
            at = max(deleted_at_ms, self._deleted_at.pop(user_id, 0))
            self._deleted_at[user_id] = at
            while len(self._deleted_at) > DELETIONS_REMEMBERED:
                self._deleted_at.popitem(last=False)

    def deleted_at(self, user_id: str) -> int | None:
        """When `user_id` was last deleted, as far as this server knows (ms), or None."""
        with self._lock:
            return self._deleted_at.get(user_id)

    def has_version(self, user_id: str) -> bool:
        """Whether this server serves (or has rejected) a version of `user_id`."""
        with self._lock:
            return self._latest.get(user_id) is not None or any(
                key[0] == user_id for key in self._rejected
            )

    def _on_record(
        self, _topic: str, key: bytes | None, value: bytes | None, timestamp_ms: int = 0
    ) -> None:
        if key is None:
            log.warning("adapter update without a key skipped")
            return
        user_id = key.decode(errors="replace")
        if value is None:
            if timestamp_ms > 0:
                self.note_deletion(user_id, timestamp_ms)
            self.apply(user_id, None)
            return
        try:
            event = events_pb2.AdapterUpdated.FromString(value)
        except Exception:  # protobuf raises DecodeError, but be safe against any garbage
            log.warning("malformed adapter update for %s skipped", user_id)
            return
        try:
            self.apply(user_id, event)
        except ValueError as exc:
            log.warning("adapter update for %s skipped: %s", user_id, exc)

    def swap_delay(self, user_id: str, version: int) -> float | None:
        """Seconds from publication to now for a version (hot-swap latency), if known."""
        published = self._published_at.pop((user_id, version), None)
        return None if published is None else time.time() - published
