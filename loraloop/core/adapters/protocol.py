"""What serving and the learner need of an adapter store, whichever holds the versions.

Two stores implement it: `AdapterStore` (a local or shared filesystem, store.py) and
`S3AdapterStore` (any S3-compatible object store, s3_store.py); `open_adapter_store`
(opening.py) picks one from settings. Both give the same guarantees: versions are
immutable, a version is listed only once it is complete, the weights' checksum is
verified when a version is read, and a retired version leaves the listing before its
files go.

Engines read adapters from local directories, so an `AdapterVersion` always names one:
for a remote store it is where this host keeps its copy, and `fetch` makes it present.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, Protocol

from loraloop.core.adapters.version import AdapterVersion


class VersionStore(Protocol):
    #: True when every listed version is readable at its path without `fetch`.
    is_local: bool

    def describe(self) -> str:
        """Where the versions are, for logs and errors (a path or an s3:// URI)."""
        ...

    def versions(self, user_id: str) -> list[int]:
        """Complete versions of a user, oldest first."""
        ...

    def has_version(self, user_id: str, version: int) -> bool: ...

    def ref(self, user_id: str, version: int) -> AdapterVersion:
        """A reference to a version (not checked, not fetched)."""
        ...

    def fetch(self, ref: AdapterVersion) -> AdapterVersion:
        """Make `ref` readable at `ref.path` (a remote store downloads and verifies it).

        Raises AdapterStoreError when the version is missing, incomplete or fails its
        checksum, OSError when the store cannot be reached."""
        ...

    def get(self, user_id: str, version: int) -> AdapterVersion:
        """A complete version, readable at its path (fetched when remote)."""
        ...

    def latest(self, user_id: str) -> AdapterVersion | None: ...

    def write(
        self,
        user_id: str,
        version: int,
        files: dict[str, bytes],
        learner_state: dict[str, Any] | None = None,
    ) -> AdapterVersion:
        """Create a version from file contents, atomically; refuses to overwrite."""
        ...

    def learner_state(self, user_id: str, version: int) -> dict[str, Any]:
        """The learner state stored with a version ({} when there is none)."""
        ...

    def retire(self, user_id: str, versions: Iterable[int]) -> list[int]:
        """Delete these versions; returns those removed."""
        ...

    def delete_user(self, user_id: str) -> bool:
        """Remove every version of a user; True when something was removed."""
        ...

    def sync_user(self, user_id: str) -> None:
        """Make a user's listing durable (what a write that failed late did not)."""
        ...

    def partial_writes(self, user_id: str) -> Sequence[object]:
        """Leftovers of writes that never completed (a writer killed half-way)."""
        ...

    def path_for_uri(self, uri: str, user_id: str, version: int) -> Path:
        """The local path of `user_id` v`version` when `uri` names exactly that version
        in this store; ValueError otherwise (an announcement can never make a server
        read anything else)."""
        ...
