"""The newest adapter version of every user, as this server knows it.

A background thread reads the compacted `adapter-updates` topic from the beginning (so a
restarted server rebuilds its view) and then follows it; the first time a user is served,
the adapter store is listed as well, because a learner killed between writing a version
and announcing it leaves the store ahead of the topic (and this server may have served
that version before it restarted). Versions only ever go up: a stale or replayed event
never makes a user's responses older. A tombstone forgets the user.

The one exception is a version that does not load (truncated, corrupt, failing its
checksum): `reject` marks it unservable here, logs and counts it, and the user is served
the newest older version that is not rejected (or the base model) until a newer one comes.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path
from urllib.parse import urlparse
from urllib.request import url2pathname

from core.adapter_store import AdapterStore
from core.gen.loraloop.v1 import events_pb2
from core.kafka.follow import TopicFollower
from service.engines.base import AdapterRef

log = logging.getLogger(__name__)


def path_from_uri(uri: str) -> Path:
    parsed = urlparse(uri)
    if parsed.scheme != "file":
        raise ValueError(f"unsupported adapter URI {uri!r}: only file:// is served")
    return Path(url2pathname(parsed.path))


class AdapterRegistry:
    def __init__(
        self,
        store: AdapterStore,
        bootstrap: str,
        topic: str,
        on_delete: Callable[[str], None] | None = None,
    ) -> None:
        self._store = store
        self._on_delete = on_delete
        self._lock = threading.Lock()
        self._latest: dict[str, AdapterRef | None] = {}
        self._checked: set[str] = set()  # users whose store directory was listed
        self._rejected: set[tuple[str, int]] = set()  # versions that failed to load
        self.rejected = 0
        self._published_at: dict[tuple[str, int], float] = {}
        self._follower = TopicFollower(bootstrap, [topic], self._on_record, "adapter-updates")
        # Metrics hook: (user_id, version, published_s, live) for every version applied;
        # live = published while we were following (not replayed at start-up).
        self.on_applied: Callable[[str, int, float, bool], None] | None = None

    def start(self) -> None:
        self._follower.start()

    def stop(self) -> None:
        self._follower.stop()

    @property
    def caught_up(self) -> threading.Event:
        """Set once every update that existed at start-up has been applied."""
        return self._follower.caught_up

    @property
    def updates_seen(self) -> int:
        return self._follower.records

    def resolve(self, user_id: str) -> AdapterRef | None:
        """The version to serve `user_id` with (None: the base model)."""
        with self._lock:
            if user_id in self._checked:
                return self._latest.get(user_id)
        stored = self._newest_stored(user_id)  # one directory listing per user and start
        with self._lock:
            if user_id not in self._checked:  # a tombstone meanwhile wins
                self._checked.add(user_id)
                current = self._latest.get(user_id)
                if stored is not None and (current is None or stored.version > current.version):
                    self._latest[user_id] = stored
            return self._latest.get(user_id)

    def _newest_stored(self, user_id: str, below: int | None = None) -> AdapterRef | None:
        """The newest complete version in the store (below `below`) not rejected here."""
        for version in reversed(self._store.versions(user_id)):
            if below is not None and version >= below:
                continue
            with self._lock:
                if (user_id, version) in self._rejected:
                    continue
            return AdapterRef(user_id, version, self._store.version_dir(user_id, version))
        return None

    def reject(self, ref: AdapterRef, error: str) -> AdapterRef | None:
        """`ref` failed to load: never serve it again here, and return what to serve
        instead (the newest older version not rejected, or None: the base model)."""
        key = (ref.user_id, ref.version)
        with self._lock:
            first = key not in self._rejected
            self._rejected.add(key)
            self.rejected += first
        if first:
            log.error(
                "adapter %s v%d cannot be served (%s): serving an older version instead",
                ref.user_id,
                ref.version,
                error,
            )
        older = self._newest_stored(ref.user_id, below=ref.version)
        with self._lock:
            current = self._latest.get(ref.user_id)
            if current is not None and current.version == ref.version:
                self._latest[ref.user_id] = current = older
            if current is not None and (ref.user_id, current.version) in self._rejected:
                return older  # (a race with another rejection: take the safe one)
            return current  # the fallback, a newer version that came meanwhile, or None

    def apply(self, user_id: str, event: events_pb2.AdapterUpdated | None) -> bool:
        """Apply one update (None = tombstone); True when it changed the served version."""
        if event is None:
            self.forget(user_id)
            if self._on_delete:
                self._on_delete(user_id)
            return True
        ref = AdapterRef(user_id, event.version, self._checked_path(user_id, event.uri))
        with self._lock:
            current = self._latest.get(user_id)
            if current is not None and current.version >= ref.version:
                return False
            if (user_id, ref.version) in self._rejected:
                return False  # announced again (a learner's replay): still unservable
            self._latest[user_id] = ref
            self._published_at[(user_id, ref.version)] = event.timestamp_ms / 1000
        if self.on_applied is not None:
            self.on_applied(
                user_id, ref.version, event.timestamp_ms / 1000, self.caught_up.is_set()
            )
        return True

    def _checked_path(self, user_id: str, uri: str) -> Path:
        """The version directory `uri` names, which must lie in this user's store directory:
        an event can never make the server read files from anywhere else."""
        path = path_from_uri(uri)
        user_dir = self._store.user_dir(user_id).resolve()  # ValueError for a bad user_id
        if not path.resolve().is_relative_to(user_dir):
            raise ValueError(f"adapter URI {uri[:200]!r} is outside {user_dir}")
        return path

    def forget(self, user_id: str) -> None:
        """Serve the base model to a deleted user, without consulting the store (the
        learner may not have removed the old versions yet); a new version re-enters."""
        with self._lock:
            self._latest[user_id] = None
            self._checked.add(user_id)
            for key in [k for k in self._published_at if k[0] == user_id]:
                del self._published_at[key]

    def _on_record(self, _topic: str, key: bytes | None, value: bytes | None) -> None:
        if key is None:
            log.warning("adapter update without a key skipped")
            return
        user_id = key.decode(errors="replace")
        if value is None:
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
