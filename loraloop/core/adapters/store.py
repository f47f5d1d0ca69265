"""Versioned, immutable per-user adapter store on a local filesystem.

Layout: `<root>/<user_id>/v<N>/`, one directory per `AdapterVersion` with the files that
`version.py` names. A version is written into a temporary sibling directory
(`.v<N>.<random>`), fsynced, then renamed into place, so readers see a whole version or
none; what a writer killed half-way leaves behind is never listed, and is removed by the
next successful write of that user.

Old versions are removed by `retire` (the learner decides which, see
loraloop/core/adapters/retention.py): each is first renamed out of the listing into a
`.v<N>.retired-<random>` sibling, then deleted, so a version is listed whole or not at all;
what a deletion killed half-way leaves behind is swept like a half-written version.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
import uuid
from collections.abc import Iterable
from pathlib import Path
from typing import Any
from urllib.parse import urlparse
from urllib.request import url2pathname

from loraloop.core.adapters.version import (
    ADAPTER_WEIGHTS,
    LEARNER_STATE,
    WEIGHTS_CHECKSUM,
    AdapterVersion,
)
from loraloop.core.durable_files import fsync_dir
from loraloop.core.fault_points import pause_point
from loraloop.core.user_ids import check_user_id

_VERSION_DIR = re.compile(r"v(\d+)")
_TEMP_DIR = re.compile(r"\.v(\d+)\..+")


class AdapterStoreError(RuntimeError):
    """A version is missing, incomplete or fails its checksum."""


def parse_learner_state(raw: bytes, user_id: str, version: int) -> dict[str, Any]:
    """A version's learner_state.json; AdapterStoreError unless it is a JSON object."""
    try:
        state = json.loads(raw)
    except ValueError as exc:
        raise AdapterStoreError(f"{user_id} v{version}: unreadable {LEARNER_STATE}: {exc}") from exc
    if not isinstance(state, dict):
        raise AdapterStoreError(f"{user_id} v{version}: {LEARNER_STATE} is not an object")
    return state


class AdapterStore:
    """Immutable versioned adapter directories under one root (a `VersionStore`)."""

    is_local = True

    def __init__(self, root: Path | str) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)

    def describe(self) -> str:
        return str(self.root)

    def user_dir(self, user_id: str) -> Path:
        return self.root / check_user_id(user_id)

    def version_dir(self, user_id: str, version: int) -> Path:
        if version < 1:
            raise ValueError(f"adapter versions start at 1, got {version}")
        return self.user_dir(user_id) / f"v{version}"

    def versions(self, user_id: str) -> list[int]:
        """Complete versions of a user, oldest first (temp dirs are never listed)."""
        udir = self.user_dir(user_id)
        if not udir.is_dir():
            return []
        found = (_VERSION_DIR.fullmatch(p.name) for p in udir.iterdir())
        return sorted(int(m.group(1)) for m in found if m)

    def has_version(self, user_id: str, version: int) -> bool:
        return self.version_dir(user_id, version).is_dir()

    def ref(self, user_id: str, version: int) -> AdapterVersion:
        return AdapterVersion(user_id, version, self.version_dir(user_id, version))

    def fetch(self, ref: AdapterVersion) -> AdapterVersion:
        """Nothing to fetch: every version is on this filesystem."""
        return ref

    def sync_user(self, user_id: str) -> None:
        fsync_dir(self.user_dir(user_id))

    def path_for_uri(self, uri: str, user_id: str, version: int) -> Path:
        parsed = urlparse(uri)
        if parsed.scheme != "file":
            raise ValueError(f"adapter URI {uri[:200]!r} is not a file:// URI of {self.root}")
        path = Path(url2pathname(parsed.path))
        expected = self.version_dir(user_id, version)  # ValueError: bad user id or version
        if path.resolve() != expected.resolve():
            raise ValueError(
                f"adapter URI {uri[:200]!r} is not the store directory of "
                f"{user_id} v{version} ({expected})"
            )
        return expected

    def latest(self, user_id: str) -> AdapterVersion | None:
        versions = self.versions(user_id)
        return self.get(user_id, versions[-1]) if versions else None

    def get(self, user_id: str, version: int) -> AdapterVersion:
        path = self.version_dir(user_id, version)
        weights = path / ADAPTER_WEIGHTS
        if not weights.is_file():
            raise AdapterStoreError(f"{user_id} v{version}: no {ADAPTER_WEIGHTS} in {path}")
        return AdapterVersion(user_id, version, path)

    def write(
        self,
        user_id: str,
        version: int,
        files: dict[str, bytes],
        learner_state: dict[str, Any] | None = None,
    ) -> AdapterVersion:
        """Atomically create `v<version>` from file contents; refuses to overwrite."""
        final = self.version_dir(user_id, version)
        if final.exists():
            raise AdapterStoreError(f"{user_id} v{version} already exists: versions are immutable")
        if ADAPTER_WEIGHTS not in files:
            raise ValueError(f"an adapter version needs {ADAPTER_WEIGHTS}")
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".v{version}.", dir=final.parent))
        try:
            contents = dict(files)
            contents[WEIGHTS_CHECKSUM] = hashlib.sha256(files[ADAPTER_WEIGHTS]).hexdigest().encode()
            if learner_state is not None:
                contents[LEARNER_STATE] = json.dumps(learner_state, sort_keys=True).encode()
            for i, (name, data) in enumerate(contents.items()):
                with (tmp / name).open("wb") as f:
                    f.write(data)
                    f.flush()
                    os.fsync(f.fileno())
                if i == 0:
                    pause_point("store.mid_write")
            fsync_dir(tmp)
            pause_point("store.before_rename")
            os.rename(tmp, final)
            fsync_dir(final.parent)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        self._sweep_partial(final.parent, version)
        return AdapterVersion(user_id, version, final)

    def partial_writes(self, user_id: str) -> list[Path]:
        """Temporary directories of writes that never completed (a writer killed half-way)."""
        udir = self.user_dir(user_id)
        if not udir.is_dir():
            return []
        return sorted(p for p in udir.iterdir() if _TEMP_DIR.fullmatch(p.name))

    def _sweep_partial(self, udir: Path, written: int) -> None:
        """Remove leftovers of writes of versions up to `written`: whoever wrote them died,
        since a version is written once and `written` is now in place."""
        for path in udir.iterdir():
            m = _TEMP_DIR.fullmatch(path.name)
            if m and int(m.group(1)) <= written:
                shutil.rmtree(path, ignore_errors=True)

    def learner_state(self, user_id: str, version: int) -> dict[str, Any]:
        """The learner state stored with a version ({} when there is none).

        Raises AdapterStoreError when the file is there but unreadable."""
        path = self.version_dir(user_id, version) / LEARNER_STATE
        if not path.is_file():
            return {}
        try:
            raw = path.read_bytes()
        except OSError as exc:
            raise AdapterStoreError(
                f"{user_id} v{version}: unreadable {LEARNER_STATE}: {exc}"
            ) from exc
        return parse_learner_state(raw, user_id, version)

    def retire(self, user_id: str, versions: Iterable[int]) -> list[int]:
        """Delete these versions of a user (those not there are skipped): each one leaves
        the listing at once (a rename), then its files go. Returns the versions removed.

        Raises OSError when a rename or a deletion fails; what was renamed before stays
        out of the listing and is swept by the user's next write."""
        udir = self.user_dir(user_id)
        removed = []
        for version in sorted(set(versions)):
            path = self.version_dir(user_id, version)
            gone = udir / f".v{version}.retired-{uuid.uuid4().hex[:12]}"
            try:
                os.rename(path, gone)
            except FileNotFoundError:
                continue
            removed.append(version)
            shutil.rmtree(gone)
        if removed:
            fsync_dir(udir)
        return removed

    def delete_user(self, user_id: str) -> bool:
        """Remove every version of a user; True when something was removed."""
        udir = self.user_dir(user_id)
        if not udir.exists():
            return False
        shutil.rmtree(udir)
        return True
