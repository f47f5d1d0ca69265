"""AdapterStore: versioned, immutable, atomic per-user adapter directories."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest

from loraloop.core.adapters.store import AdapterStore, AdapterStoreError
from loraloop.core.adapters.version import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    LEARNER_STATE,
    sha256_file,
)


def _files(tag: bytes = b"w1") -> dict[str, bytes]:
    return {ADAPTER_WEIGHTS: b"weights-" + tag, ADAPTER_CONFIG: b'{"peft_type": "LORA"}'}


@pytest.fixture
def store(tmp_path: Path) -> AdapterStore:
    return AdapterStore(tmp_path / "store")


def test_write_then_read_back(store: AdapterStore) -> None:
    stored = store.write("alice", 1, _files(b"one"), learner_state={"baseline": 0.25})
    assert stored.user_id == "alice" and stored.version == 1
    assert stored.path == store.root / "alice" / "v1"
    assert (stored.path / ADAPTER_WEIGHTS).read_bytes() == b"weights-one"
    assert (stored.path / ADAPTER_CONFIG).read_bytes() == b'{"peft_type": "LORA"}'
    assert json.loads((stored.path / LEARNER_STATE).read_text()) == {"baseline": 0.25}
    assert store.learner_state("alice", 1) == {"baseline": 0.25}
    assert stored.uri.startswith("file://") and stored.uri.endswith("/alice/v1")
    got = store.get("alice", 1)
    assert got == stored


def test_versions_and_latest(store: AdapterStore) -> None:
    assert store.versions("alice") == []
    assert store.latest("alice") is None
    for v in (2, 1, 10):  # out of order; 10 must sort numerically after 2
        store.write("alice", v, _files(str(v).encode()))
    assert store.versions("alice") == [1, 2, 10]
    latest = store.latest("alice")
    assert latest is not None and latest.version == 10
    assert (latest.path / ADAPTER_WEIGHTS).read_bytes() == b"weights-10"
    # another user's versions are separate
    assert store.versions("bob") == []


def test_learner_state_absent_is_empty(store: AdapterStore) -> None:
    store.write("alice", 1, _files())
    assert store.learner_state("alice", 1) == {}
    assert not (store.version_dir("alice", 1) / LEARNER_STATE).exists()


def test_version_numbers_start_at_one(store: AdapterStore) -> None:
    with pytest.raises(ValueError, match="start at 1"):
        store.write("alice", 0, _files())
    with pytest.raises(ValueError, match="start at 1"):
        store.version_dir("alice", -3)


def test_versions_are_immutable(store: AdapterStore) -> None:
    store.write("alice", 1, _files(b"first"))
    with pytest.raises(AdapterStoreError, match="immutable"):
        store.write("alice", 1, _files(b"second"))
    assert (store.version_dir("alice", 1) / ADAPTER_WEIGHTS).read_bytes() == b"weights-first"
    assert store.versions("alice") == [1]
    # nothing else (such as a temp dir) was left behind by the refused write
    assert sorted(p.name for p in (store.root / "alice").iterdir()) == ["v1"]


def test_write_without_weights_is_refused_and_leaves_nothing(store: AdapterStore) -> None:
    with pytest.raises(ValueError, match=ADAPTER_WEIGHTS):
        store.write("alice", 1, {ADAPTER_CONFIG: b"{}"})
    assert store.versions("alice") == []
    assert store.latest("alice") is None
    udir = store.root / "alice"
    assert not udir.exists() or list(udir.iterdir()) == []


def test_failed_rename_leaves_no_version_and_no_temp_dir(
    store: AdapterStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    store.write("alice", 1, _files(b"v1"))

    def boom(src, dst):
        raise OSError("disk full (simulated)")

    monkeypatch.setattr(os, "rename", boom)
    with pytest.raises(OSError, match="simulated"):
        store.write("alice", 2, _files(b"v2"))
    monkeypatch.undo()
    assert store.versions("alice") == [1]
    assert store.latest("alice").version == 1  # type: ignore[union-attr]
    # the temporary sibling directory was cleaned up
    assert sorted(p.name for p in (store.root / "alice").iterdir()) == ["v1"]
    # the version number is still free: a retry succeeds
    assert store.write("alice", 2, _files(b"v2")).version == 2
    assert store.versions("alice") == [1, 2]


def test_failure_while_writing_a_file_cleans_up(
    store: AdapterStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = {"n": 0}
    real_fsync = os.fsync

    def flaky_fsync(fd: int) -> None:
        calls["n"] += 1
        if calls["n"] == 2:  # the second file's fsync fails
            raise OSError("I/O error (simulated)")
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", flaky_fsync)
    with pytest.raises(OSError, match="simulated"):
        store.write("alice", 1, _files(), learner_state={"x": 1})
    monkeypatch.undo()
    assert store.versions("alice") == []
    assert list((store.root / "alice").iterdir()) == []


def test_temp_dirs_are_never_listed(store: AdapterStore) -> None:
    store.write("alice", 1, _files())
    udir = store.root / "alice"
    # leftovers a crashed writer could leave, and unrelated names
    (udir / ".v2.abc123").mkdir()
    (udir / ".v2.abc123" / ADAPTER_WEIGHTS).write_bytes(b"half")
    (udir / "v3.tmp").mkdir()
    (udir / "notes").mkdir()
    assert store.versions("alice") == [1]
    assert store.latest("alice").version == 1  # type: ignore[union-attr]


def test_get_missing_or_incomplete_version_raises(store: AdapterStore) -> None:
    with pytest.raises(AdapterStoreError):
        store.get("alice", 1)
    (store.root / "alice" / "v1").mkdir(parents=True)  # no weights inside
    with pytest.raises(AdapterStoreError, match=ADAPTER_WEIGHTS):
        store.get("alice", 1)


def test_checksum_is_sha256_of_weights_file(store: AdapterStore) -> None:
    payload = os.urandom(3 * (1 << 20) + 17)  # spans several read chunks
    files = {ADAPTER_WEIGHTS: payload, ADAPTER_CONFIG: b"{}"}
    stored = store.write("alice", 1, files)
    expected = hashlib.sha256(payload).hexdigest()
    assert stored.checksum == expected
    assert store.get("alice", 1).checksum == expected
    assert sha256_file(stored.path / ADAPTER_WEIGHTS) == expected
    # the checksum depends on the weights only, not on the config
    other = store.write("bob", 1, {ADAPTER_WEIGHTS: payload, ADAPTER_CONFIG: b'{"r": 4}'})
    assert other.checksum == expected
    third = store.write("carol", 1, {ADAPTER_WEIGHTS: payload + b"x"})
    assert third.checksum != expected


@pytest.mark.parametrize(
    "bad", ["..", ".", "a/b", "../alice", "", "x" * 200, "a\\b", "al ice", "a\x00b", "é"]
)
def test_user_ids_that_could_escape_the_store_are_refused(store: AdapterStore, bad: str) -> None:
    with pytest.raises(ValueError):
        store.write(bad, 1, _files())
    with pytest.raises(ValueError):
        store.versions(bad)
    with pytest.raises(ValueError):
        store.latest(bad)
    with pytest.raises(ValueError):
        store.delete_user(bad)
    # nothing was created anywhere, inside or beside the store
    assert list(store.root.iterdir()) == []
    assert sorted(p.name for p in store.root.parent.iterdir()) == ["store"]


@pytest.mark.parametrize("good", ["alice", "a.b@c-d_e", "x" * 128, "..."])
def test_valid_user_ids_are_accepted(store: AdapterStore, good: str) -> None:
    stored = store.write(good, 1, _files())
    assert stored.path.parent == store.root / good
    assert store.versions(good) == [1]


def test_delete_user_removes_everything(store: AdapterStore) -> None:
    for v in (1, 2, 3):
        store.write("alice", v, _files(), learner_state={"v": v})
    store.write("bob", 1, _files())
    assert store.delete_user("alice") is True
    assert not (store.root / "alice").exists()
    assert store.versions("alice") == []
    assert store.latest("alice") is None
    assert store.delete_user("alice") is False  # nothing left to remove
    assert store.versions("bob") == [1]  # other users untouched
    # a deleted user can start again from v1
    assert store.write("alice", 1, _files()).version == 1
