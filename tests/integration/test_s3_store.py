"""The S3 adapter store against a real S3 server (SeaweedFS on loopback), and the
guarantees both stores share (immutable versions, listed only once complete, checksums
verified on read, retirement that leaves the listing first), run against each."""

from __future__ import annotations

import hashlib
import json
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from loraloop.core.adapters.opening import AdapterStoreConfigError, open_adapter_store
from loraloop.core.adapters.protocol import VersionStore
from loraloop.core.adapters.s3_store import (
    MANIFEST_SUFFIX,
    S3AdapterStore,
    S3StoreUnavailable,
    make_client,
)
from loraloop.core.adapters.store import AdapterStore, AdapterStoreError
from loraloop.core.adapters.version import ADAPTER_CONFIG, ADAPTER_WEIGHTS, LEARNER_STATE
from loraloop.core.settings import Settings


def _files(tag: bytes = b"w1") -> dict[str, bytes]:
    return {ADAPTER_WEIGHTS: b"weights-" + tag, ADAPTER_CONFIG: b'{"peft_type": "LORA"}'}


def _s3(env: dict[str, str], tmp_path: Path, prefix: str, copies: str = "a") -> S3AdapterStore:
    del env  # (the fixture has put the AWS variables in the environment)
    return S3AdapterStore(f"s3://adapters/{prefix}", tmp_path / f"copies-{copies}")


@pytest.fixture
def prefix() -> str:
    return f"t-{uuid.uuid4().hex[:10]}"  # every test its own corner of the bucket


@pytest.fixture(params=["file", "s3"])
def any_store(
    request: pytest.FixtureRequest, tmp_path: Path, prefix: str
) -> Iterator[VersionStore]:
    if request.param == "file":
        yield AdapterStore(tmp_path / "store")
    else:
        yield _s3(request.getfixturevalue("s3_env"), tmp_path, prefix)


# --- what both stores guarantee --------------------------------------------------------------


def test_write_read_list_and_immutability(any_store: VersionStore) -> None:
    stored = any_store.write("alice", 1, _files(b"one"), learner_state={"baseline": 0.25})
    any_store.write("alice", 2, _files(b"two"))
    assert any_store.versions("alice") == [1, 2] and any_store.versions("bob") == []
    assert any_store.has_version("alice", 2) and not any_store.has_version("alice", 3)
    got = any_store.get("alice", 1)
    assert got == stored and (got.path / ADAPTER_WEIGHTS).read_bytes() == b"weights-one"
    assert any_store.learner_state("alice", 1) == {"baseline": 0.25}
    assert any_store.learner_state("alice", 2) == {}
    latest = any_store.latest("alice")
    assert latest is not None and latest.version == 2
    with pytest.raises(AdapterStoreError, match="immutable"):
        any_store.write("alice", 2, _files(b"again"))
    assert (any_store.get("alice", 2).path / ADAPTER_WEIGHTS).read_bytes() == b"weights-two"
    # an announcement's URI must name exactly this version in this store
    assert any_store.path_for_uri(stored.uri, "alice", 1) == stored.path
    with pytest.raises(ValueError):
        any_store.path_for_uri(stored.uri, "alice", 2)
    with pytest.raises(ValueError):
        any_store.path_for_uri("file:///etc", "alice", 1)


def test_retire_and_delete_user(any_store: VersionStore) -> None:
    for v in (1, 2, 3):
        any_store.write("ann", v, _files(str(v).encode()))
    assert any_store.retire("ann", [1, 2, 7]) == [1, 2]
    assert any_store.versions("ann") == [3]
    assert not any_store.partial_writes("ann")
    with pytest.raises((AdapterStoreError, FileNotFoundError)):
        any_store.get("ann", 1)
    assert any_store.delete_user("ann") and any_store.versions("ann") == []
    assert not any_store.delete_user("ann")


# --- S3 only ---------------------------------------------------------------------------------


def test_s3_layout_manifest_last_and_uri(
    s3_env: dict[str, str], tmp_path: Path, prefix: str
) -> None:
    store = _s3(s3_env, tmp_path, prefix)
    stored = store.write("alice", 1, _files(b"one"), {"baseline": 0.5})
    assert stored.uri == f"s3://adapters/{prefix}/alice/v1/"
    assert stored.path == tmp_path / "copies-a" / "alice" / "v1"  # the writer's own copy
    keys = {
        o["Key"] for o in store._s3.list_objects_v2(Bucket="adapters", Prefix=prefix)["Contents"]
    }
    assert f"{prefix}/alice/v1{MANIFEST_SUFFIX}" in keys
    assert {
        f"{prefix}/alice/v1/{n}" for n in (ADAPTER_WEIGHTS, ADAPTER_CONFIG, LEARNER_STATE)
    } <= keys
    manifest = store.manifest("alice", 1)
    weights = manifest["files"][ADAPTER_WEIGHTS]
    assert weights == {"size": 11, "sha256": hashlib.sha256(b"weights-one").hexdigest()}
    assert manifest["version"] == 1 and manifest["user_id"] == "alice"


def test_another_host_fetches_into_its_own_copy(
    s3_env: dict[str, str], tmp_path: Path, prefix: str
) -> None:
    writer = _s3(s3_env, tmp_path, prefix, "learner")
    reader = _s3(s3_env, tmp_path, prefix, "server")
    writer.write("bo", 1, _files(b"one"), {"n": 1})
    assert reader.versions("bo") == [1]
    ref = reader.ref("bo", 1)
    assert not ref.path.exists()  # listed, not fetched
    assert reader.learner_state("bo", 1) == {"n": 1}  # read from the store, no fetch
    fetched = reader.fetch(ref)
    assert (fetched.path / ADAPTER_WEIGHTS).read_bytes() == b"weights-one"
    assert fetched.path.parent == tmp_path / "copies-server" / "bo"
    # the host keeps its two newest copies of a user
    for v in (2, 3):
        writer.write("bo", v, _files(str(v).encode()))
        reader.get("bo", v)
    assert sorted(p.name for p in (tmp_path / "copies-server" / "bo").iterdir()) == ["v2", "v3"]
    # concurrent fetches of one version: one copy, every caller gets it
    writer.write("bo", 4, _files(b"four"))
    results: list[Any] = []
    threads = [
        threading.Thread(target=lambda: results.append(reader.get("bo", 4))) for _ in range(4)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == 4 and all(
        (r.path / ADAPTER_WEIGHTS).read_bytes() == b"weights-four" for r in results
    )
    assert not [p for p in (tmp_path / "copies-server" / "bo").iterdir() if p.name.startswith(".")]


def test_uncommitted_objects_are_never_listed_and_are_swept(
    s3_env: dict[str, str], tmp_path: Path, prefix: str
) -> None:
    """A writer killed between its uploads and its manifest leaves objects no reader lists;
    the user's next successful write removes them."""
    store = _s3(s3_env, tmp_path, prefix)
    store.write("cy", 1, _files(b"one"))
    store._s3.put_object(Bucket="adapters", Key=f"{prefix}/cy/v2/{ADAPTER_WEIGHTS}", Body=b"half")
    assert store.versions("cy") == [1] and not store.has_version("cy", 2)
    assert store.partial_writes("cy") == [f"{prefix}/cy/v2/{ADAPTER_WEIGHTS}"]
    with pytest.raises(AdapterStoreError, match="not in"):
        _s3(s3_env, tmp_path, prefix, "other").get("cy", 2)
    store.write("cy", 2, _files(b"two"))  # the rewrite of v2 (another learner, a retry)
    assert store.versions("cy") == [1, 2] and store.partial_writes("cy") == []
    assert (
        _s3(s3_env, tmp_path, prefix, "b").get("cy", 2).path / ADAPTER_WEIGHTS
    ).read_bytes() == b"weights-two"


def test_a_corrupt_or_missing_object_fails_its_checksum(
    s3_env: dict[str, str], tmp_path: Path, prefix: str
) -> None:
    store = _s3(s3_env, tmp_path, prefix, "learner")
    store.write("di", 1, _files(b"one"))
    store.write("di", 2, _files(b"two"))
    # bit rot (or a writer that overwrote the object) after the commit
    store._s3.put_object(
        Bucket="adapters", Key=f"{prefix}/di/v1/{ADAPTER_WEIGHTS}", Body=b"weights-0ne"
    )
    reader = _s3(s3_env, tmp_path, prefix, "server")
    with pytest.raises(AdapterStoreError, match="fails its checksum"):
        reader.get("di", 1)
    assert not reader.version_dir("di", 1).exists()  # nothing half-fetched is left
    store._s3.delete_object(Bucket="adapters", Key=f"{prefix}/di/v2/{ADAPTER_CONFIG}")
    with pytest.raises(AdapterStoreError, match="missing"):
        reader.get("di", 2)
    store._s3.put_object(
        Bucket="adapters", Key=f"{prefix}/di/v3{MANIFEST_SUFFIX}", Body=b"{not json"
    )
    with pytest.raises(AdapterStoreError, match="unreadable manifest"):
        reader.get("di", 3)


def test_retired_manifest_goes_first(s3_env: dict[str, str], tmp_path: Path, prefix: str) -> None:
    """A retirement cut short after the manifest went leaves only unlisted objects, which
    the next write sweeps: a version is listed whole or not at all."""
    store = _s3(s3_env, tmp_path, prefix)
    for v in (1, 2):
        store.write("ed", v, _files(str(v).encode()))
    store._s3.delete_object(Bucket="adapters", Key=f"{prefix}/ed/v1{MANIFEST_SUFFIX}")
    assert store.versions("ed") == [2] and store.partial_writes("ed")
    store.write("ed", 3, _files(b"3"))
    assert store.partial_writes("ed") == [] and store.versions("ed") == [2, 3]


def test_listing_pages_past_1000_objects(
    s3_env: dict[str, str], tmp_path: Path, prefix: str
) -> None:
    store = _s3(s3_env, tmp_path, prefix)
    client = store._s3
    for v in range(1, 1006):  # manifests only: what the listing reads
        client.put_object(Bucket="adapters", Key=f"{prefix}/fy/v{v}{MANIFEST_SUFFIX}", Body=b"{}")
    assert store.versions("fy") == list(range(1, 1006))


def test_opening_from_settings(s3_env: dict[str, str], tmp_path: Path, prefix: str) -> None:
    store = open_adapter_store(
        Settings(adapter_store_uri=f"s3://adapters/{prefix}", adapter_cache_dir=tmp_path / "c")
    )
    assert isinstance(store, S3AdapterStore) and store.describe() == f"s3://adapters/{prefix}"
    local = open_adapter_store(Settings(adapter_store_uri=(tmp_path / "d").as_uri()))
    assert isinstance(local, AdapterStore) and local.root == tmp_path / "d"
    assert isinstance(open_adapter_store(Settings(adapter_store=tmp_path / "e")), AdapterStore)
    with pytest.raises(AdapterStoreConfigError, match="create it"):
        open_adapter_store(
            Settings(adapter_store_uri="s3://no-such-bucket/x", adapter_cache_dir=tmp_path)
        )
    with pytest.raises(AdapterStoreConfigError, match="s3://bucket/prefix"):
        open_adapter_store(Settings(adapter_store_uri="gs://bucket/x"))


def test_an_unreachable_store_is_a_transient_error(
    s3_env: dict[str, str], tmp_path: Path, prefix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """OSError (what serving and the learner retry), raised within seconds; at start-up,
    a message naming what to check."""
    store = _s3(s3_env, tmp_path, prefix)
    store.write("gus", 1, _files())
    cut = _s3(s3_env, tmp_path, prefix, "fresh")  # no copy of v1 on this host yet
    with socket_closed() as dead:
        monkeypatch.setenv("AWS_ENDPOINT_URL", dead)
        started = time.monotonic()
        with pytest.raises(AdapterStoreConfigError, match="AWS_ENDPOINT_URL"):
            open_adapter_store(
                Settings(adapter_store_uri=f"s3://adapters/{prefix}", adapter_cache_dir=tmp_path)
            )
        cut._s3 = make_client()  # the same store, its endpoint gone
        with pytest.raises(S3StoreUnavailable):
            cut.versions("gus")
        with pytest.raises(OSError):
            cut.fetch(cut.ref("gus", 1))
        assert time.monotonic() - started < 60
        assert not cut.version_dir("gus", 1).exists()


class socket_closed:
    """An http:// endpoint on a loopback port nothing listens on."""

    def __enter__(self) -> str:
        import socket

        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        self.port = s.getsockname()[1]
        s.close()
        return f"http://127.0.0.1:{self.port}"

    def __exit__(self, *exc: object) -> None:
        return None


def test_state_json_in_store_is_what_was_given(
    s3_env: dict[str, str], tmp_path: Path, prefix: str
) -> None:
    store = _s3(s3_env, tmp_path, prefix)
    state = {"applied_offsets": {"0": [1, 5]}, "guard": {"best_version": 1}}
    store.write("hal", 1, _files(), state)
    raw = store._s3.get_object(Bucket="adapters", Key=f"{prefix}/hal/v1/{LEARNER_STATE}")[
        "Body"
    ].read()
    assert json.loads(raw) == state
