"""One immutable adapter version of one user, and the files of its directory.

A version directory holds PEFT's `adapter_config.json` and `adapter_model.safetensors`,
the weights' SHA-256 in `adapter_model.safetensors.sha256`, and `learner_state.json` (the
learner's per-user state that belongs with that version). The store writes them; serving
and the learner read them through an `AdapterVersion`.
"""

from __future__ import annotations

import functools
import hashlib
from dataclasses import dataclass, field
from pathlib import Path

ADAPTER_WEIGHTS = "adapter_model.safetensors"
WEIGHTS_CHECKSUM = ADAPTER_WEIGHTS + ".sha256"
ADAPTER_CONFIG = "adapter_config.json"
LEARNER_STATE = "learner_state.json"


@dataclass(frozen=True)
class AdapterVersion:
    """One immutable adapter version of one user: version `version` of `user_id`'s
    adapter, in the local directory `path` (for a remote store: where this host keeps its
    copy, which may not be fetched yet). Equal (and hashed) by those three fields.
    `remote` is the version's URI in a remote store ("" for a local one)."""

    user_id: str
    version: int
    path: Path
    remote: str = field(default="", compare=False)

    @property
    def uri(self) -> str:
        """Where the version lives, as announced to serving: the remote URI, else file://."""
        return self.remote or self.path.resolve().as_uri()

    @functools.cached_property
    def checksum(self) -> str:
        """SHA-256 of the weights as written (serving never needs it): the recorded one,
        else (a version written without it) computed from the file."""
        return expected_checksum(self.path) or sha256_file(self.path / ADAPTER_WEIGHTS)


def expected_checksum(version_dir: Path) -> str | None:
    """The SHA-256 the weights had when this version was written (None: not recorded)."""
    try:
        return (version_dir / WEIGHTS_CHECKSUM).read_text().strip() or None
    except FileNotFoundError:
        return None


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()
