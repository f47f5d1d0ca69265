"""Versioned, immutable per-user adapter store in an S3-compatible object store.

Layout under `s3://<bucket>/<prefix>/`:

    <user_id>/v<N>/<file>          the version's files (those version.py names)
    <user_id>/v<N>.manifest.json   written last: the commit marker

S3 has no rename, so a version becomes visible by its manifest: the files are uploaded
first, then the manifest, which lists every file with its size and SHA-256. Readers list
manifests only, so a writer killed half-way leaves objects that are never listed (and
are removed by that user's next successful write). A version is retired by deleting its
manifest first (it leaves the listing at once), then its files.

Servers and the learner read a version from a local copy under `cache_dir`
(`<cache_dir>/<user_id>/v<N>/`, what `AdapterVersion.path` names): `fetch` downloads
the files into a temporary sibling, checks each against the manifest, then renames the
directory into place, so a copy is whole or absent. Of each user's copies, the newest
`keep_copies` stay; versions are immutable, so a copy never goes stale.

The client is boto3, configured the usual AWS way: credentials from AWS_ACCESS_KEY_ID /
AWS_SECRET_ACCESS_KEY (or a profile, or the pod's identity), the region from AWS_REGION,
and any S3-compatible endpoint (MinIO, SeaweedFS, ...) from AWS_ENDPOINT_URL. Failures
to reach the store surface as `S3StoreUnavailable`, an OSError, which serving and the
learner already treat as transient.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from loraloop.core.adapters.store import AdapterStoreError, parse_learner_state
from loraloop.core.adapters.version import (
    ADAPTER_WEIGHTS,
    LEARNER_STATE,
    WEIGHTS_CHECKSUM,
    AdapterVersion,
)
from loraloop.core.fault_points import pause_point
from loraloop.core.user_ids import check_user_id

MANIFEST_SUFFIX = ".manifest.json"
_MANIFEST = re.compile(r"v(\d+)" + re.escape(MANIFEST_SUFFIX))
_FILE = re.compile(r"v(\d+)/(.+)")
_TEMP_DIR = re.compile(r"\.v(\d+)\..+")
_COPY_DIR = re.compile(r"v\d+")
MANIFEST_FORMAT = 1


class S3StoreUnavailable(OSError):
    """The object store could not be reached or refused the request (transient)."""


def parse_s3_uri(uri: str) -> tuple[str, str]:
    """`s3://bucket/prefix` -> (bucket, prefix without surrounding slashes)."""
    parsed = urlparse(uri)
    if parsed.scheme != "s3" or not parsed.netloc:
        raise ValueError(f"{uri!r} is not an s3://bucket/prefix URI")
    return parsed.netloc, parsed.path.strip("/")


def _client_error_code(exc: Exception) -> str:
    response = getattr(exc, "response", None) or {}
    return str(response.get("Error", {}).get("Code", ""))


class S3AdapterStore:
    """Immutable adapter versions in an S3 bucket (a `VersionStore`); see the module."""

    is_local = False

    def __init__(
        self, uri: str, cache_dir: Path | str, keep_copies: int = 2, client: Any = None
    ) -> None:
        self.bucket, self.prefix = parse_s3_uri(uri)
        self.cache_dir = Path(cache_dir)
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        self.keep_copies = max(1, keep_copies)
        self._s3 = client if client is not None else make_client()
        self.check_bucket()

    # --- naming ----------------------------------------------------------------------------
    def describe(self) -> str:
        return f"s3://{self.bucket}/{self.prefix}" if self.prefix else f"s3://{self.bucket}"

    def _key(self, *parts: str) -> str:
        return "/".join(p for p in (self.prefix, *parts) if p)

    def _user_prefix(self, user_id: str) -> str:
        return self._key(check_user_id(user_id)) + "/"

    def _manifest_key(self, user_id: str, version: int) -> str:
        return self._key(check_user_id(user_id), f"v{_checked(version)}{MANIFEST_SUFFIX}")

    def _file_key(self, user_id: str, version: int, name: str) -> str:
        return self._key(check_user_id(user_id), f"v{_checked(version)}", name)

    def version_uri(self, user_id: str, version: int) -> str:
        """The version's "directory" in the bucket (what announcements carry)."""
        return f"s3://{self.bucket}/{self._key(check_user_id(user_id), f'v{_checked(version)}')}/"

    def version_dir(self, user_id: str, version: int) -> Path:
        """Where this host keeps its copy of the version."""
        return self.cache_dir / check_user_id(user_id) / f"v{_checked(version)}"

    def ref(self, user_id: str, version: int) -> AdapterVersion:
        return AdapterVersion(
            user_id, version, self.version_dir(user_id, version), self.version_uri(user_id, version)
        )

    def path_for_uri(self, uri: str, user_id: str, version: int) -> Path:
        expected = self.version_uri(user_id, version)  # ValueError: bad user id or version
        if uri.rstrip("/") != expected.rstrip("/"):
            raise ValueError(
                f"adapter URI {uri[:200]!r} is not the store's URI of {user_id} v{version} "
                f"({expected})"
            )
        return self.version_dir(user_id, version)

    # --- S3 calls --------------------------------------------------------------------------
    def _call(self, what: str, fn: Any, **kwargs: Any) -> Any:
        """One S3 request; a failure that is not "no such key" becomes S3StoreUnavailable."""
        try:
            return fn(Bucket=self.bucket, **kwargs)
        except Exception as exc:
            code = _client_error_code(exc)
            if code in ("NoSuchKey", "404", "NotFound"):
                raise FileNotFoundError(f"{what}: no such object in {self.describe()}") from exc
            raise S3StoreUnavailable(f"{what} in {self.describe()}: {exc}") from exc

    def check_bucket(self) -> None:
        """Raise S3StoreUnavailable, saying what to fix, unless the bucket answers."""
        try:
            self._s3.head_bucket(Bucket=self.bucket)
        except Exception as exc:
            code = _client_error_code(exc)
            hint = (
                "create it, or point LORALOOP_ADAPTER_STORE_URI at one that exists"
                if code in ("404", "NoSuchBucket", "NotFound")
                else "check AWS_ENDPOINT_URL, the credentials (AWS_ACCESS_KEY_ID, "
                "AWS_SECRET_ACCESS_KEY) and AWS_REGION"
            )
            raise S3StoreUnavailable(
                f"adapter store bucket {self.bucket!r} does not answer ({exc}): {hint}"
            ) from exc

    def _list(self, prefix: str, delimiter: str = "") -> Iterator[dict[str, Any]]:
        """Every object under `prefix` (paginated)."""
        token: str | None = None
        while True:
            kwargs: dict[str, Any] = {"Prefix": prefix}
            if delimiter:
                kwargs["Delimiter"] = delimiter
            if token:
                kwargs["ContinuationToken"] = token
            page = self._call(f"listing {prefix}", self._s3.list_objects_v2, **kwargs)
            yield from page.get("Contents", [])
            if not page.get("IsTruncated"):
                return
            token = page.get("NextContinuationToken")

    def _get(self, key: str) -> bytes:
        body = self._call(f"reading {key}", self._s3.get_object, Key=key)["Body"]
        try:
            return bytes(body.read())
        except Exception as exc:  # the connection broke mid-body
            raise S3StoreUnavailable(f"reading {key}: {exc}") from exc

    def _put(self, key: str, data: bytes) -> None:
        self._call(f"writing {key}", self._s3.put_object, Key=key, Body=data)

    def _delete(self, keys: list[str]) -> None:
        for start in range(0, len(keys), 1000):  # DeleteObjects takes up to 1000 keys
            chunk = [{"Key": k} for k in keys[start : start + 1000]]
            answer = self._call(
                "deleting objects", self._s3.delete_objects, Delete={"Objects": chunk}
            )
            errors = answer.get("Errors") or []
            if errors:
                raise S3StoreUnavailable(f"deleting {errors[0].get('Key')}: {errors[0]}")

    # --- listing ---------------------------------------------------------------------------
    def versions(self, user_id: str) -> list[int]:
        """Committed versions of a user (those with a manifest), oldest first."""
        prefix = self._user_prefix(user_id)
        found = (_MANIFEST.fullmatch(o["Key"][len(prefix) :]) for o in self._list(prefix, "/"))
        return sorted(int(m.group(1)) for m in found if m)

    def has_version(self, user_id: str, version: int) -> bool:
        try:
            self._call(
                "checking a manifest",
                self._s3.head_object,
                Key=self._manifest_key(user_id, version),
            )
        except FileNotFoundError:
            return False
        return True

    def manifest(self, user_id: str, version: int) -> dict[str, Any]:
        """The version's manifest; AdapterStoreError when it is missing or unreadable."""
        key = self._manifest_key(user_id, version)
        try:
            manifest = json.loads(self._get(key))
        except FileNotFoundError as exc:
            raise AdapterStoreError(f"{user_id} v{version}: not in {self.describe()}") from exc
        except ValueError as exc:
            raise AdapterStoreError(f"{user_id} v{version}: unreadable manifest: {exc}") from exc
        files = manifest.get("files") if isinstance(manifest, dict) else None
        if not isinstance(files, dict) or ADAPTER_WEIGHTS not in files:
            raise AdapterStoreError(f"{user_id} v{version}: manifest lists no {ADAPTER_WEIGHTS}")
        return manifest

    def _objects(self, user_id: str) -> tuple[set[int], list[tuple[int, str]]]:
        """One listing of a user: the committed versions (those with a manifest), and
        (version, key) of every version file."""
        prefix = self._user_prefix(user_id)
        committed: set[int] = set()
        files: list[tuple[int, str]] = []
        for o in self._list(prefix):
            name = o["Key"][len(prefix) :]
            if m := _MANIFEST.fullmatch(name):
                committed.add(int(m.group(1)))
            elif m := _FILE.fullmatch(name):
                files.append((int(m.group(1)), o["Key"]))
        return committed, files

    def partial_writes(self, user_id: str) -> list[str]:
        """Object keys of versions without a manifest (writes or retirements cut short)."""
        committed, files = self._objects(user_id)
        return sorted(key for v, key in files if v not in committed)

    # --- reading ---------------------------------------------------------------------------
    def fetch(self, ref: AdapterVersion) -> AdapterVersion:
        """Download `ref` into this host's copy (unless it is there), checked against its
        manifest: each file's size and SHA-256."""
        final = self.version_dir(ref.user_id, ref.version)
        if (final / ADAPTER_WEIGHTS).is_file():
            return self.ref(ref.user_id, ref.version)
        manifest = self.manifest(ref.user_id, ref.version)
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".v{ref.version}.", dir=final.parent))
        try:
            for name, meta in manifest["files"].items():
                if "/" in name or name.startswith("."):
                    raise AdapterStoreError(f"{ref.user_id} v{ref.version}: bad file name {name!r}")
                try:
                    data = self._get(self._file_key(ref.user_id, ref.version, name))
                except FileNotFoundError as exc:
                    raise AdapterStoreError(
                        f"{ref.user_id} v{ref.version}: {name} is missing from the store"
                    ) from exc
                digest = hashlib.sha256(data).hexdigest()
                if len(data) != meta.get("size") or digest != meta.get("sha256"):
                    raise AdapterStoreError(
                        f"{ref.user_id} v{ref.version}: {name} fails its checksum "
                        f"({len(data)} bytes, sha256 {digest[:16]}…; the manifest says "
                        f"{meta.get('size')} bytes, {str(meta.get('sha256'))[:16]}…)"
                    )
                (tmp / name).write_bytes(data)
            try:
                os.rename(tmp, final)
            except OSError:
                if not (final / ADAPTER_WEIGHTS).is_file():
                    raise  # (else another fetch of the same version won the race)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        self._trim_copies(ref.user_id)
        return self.ref(ref.user_id, ref.version)

    def get(self, user_id: str, version: int) -> AdapterVersion:
        return self.fetch(self.ref(user_id, version))

    def latest(self, user_id: str) -> AdapterVersion | None:
        versions = self.versions(user_id)
        return self.get(user_id, versions[-1]) if versions else None

    def learner_state(self, user_id: str, version: int) -> dict[str, Any]:
        """The learner state stored with a version ({} when there is none); read from the
        local copy when there is one, else from the store."""
        local = self.version_dir(user_id, version) / LEARNER_STATE
        try:
            if local.is_file():
                raw = local.read_bytes()
            else:
                raw = self._get(self._file_key(user_id, version, LEARNER_STATE))
        except FileNotFoundError:
            return {}
        return parse_learner_state(raw, user_id, version)

    # --- writing ---------------------------------------------------------------------------
    def write(
        self,
        user_id: str,
        version: int,
        files: dict[str, bytes],
        learner_state: dict[str, Any] | None = None,
    ) -> AdapterVersion:
        """Upload the files, then the manifest (the commit); refuses to overwrite. The
        writer's own copy is kept in the local cache (the learner reads it back)."""
        if ADAPTER_WEIGHTS not in files:
            raise ValueError(f"an adapter version needs {ADAPTER_WEIGHTS}")
        if self.has_version(user_id, version):
            raise AdapterStoreError(f"{user_id} v{version} already exists: versions are immutable")
        contents = dict(files)
        contents[WEIGHTS_CHECKSUM] = hashlib.sha256(files[ADAPTER_WEIGHTS]).hexdigest().encode()
        if learner_state is not None:
            contents[LEARNER_STATE] = json.dumps(learner_state, sort_keys=True).encode()
        for i, (name, data) in enumerate(contents.items()):
            self._put(self._file_key(user_id, version, name), data)
            if i == 0:
                pause_point("store.mid_write")
        manifest = {
            "format": MANIFEST_FORMAT,
            "user_id": user_id,
            "version": version,
            "written_ms": int(time.time() * 1000),
            "files": {
                name: {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
                for name, data in contents.items()
            },
        }
        pause_point("store.before_rename")
        self._put(self._manifest_key(user_id, version), json.dumps(manifest).encode())
        self._keep_copy(user_id, version, contents)
        self._sweep_partial(user_id, version)
        return self.ref(user_id, version)

    def _keep_copy(self, user_id: str, version: int, contents: dict[str, bytes]) -> None:
        """The writer's local copy, written like a fetch (whole or absent); best effort."""
        final = self.version_dir(user_id, version)
        tmp: Path | None = None
        try:
            final.parent.mkdir(parents=True, exist_ok=True)
            tmp = Path(tempfile.mkdtemp(prefix=f".v{version}.", dir=final.parent))
            for name, data in contents.items():
                (tmp / name).write_bytes(data)
            os.rename(tmp, final)
        except OSError:
            if tmp is not None:
                shutil.rmtree(tmp, ignore_errors=True)
            return  # a later read fetches it from the store
        self._trim_copies(user_id)

    def _sweep_partial(self, user_id: str, written: int) -> None:
        """Delete objects of uncommitted versions up to `written`: whoever wrote (or was
        retiring) them is gone, since a version is written once and `written` is in."""
        committed, files = self._objects(user_id)
        stale = [key for v, key in files if v <= written and v not in committed]
        if stale:
            self._delete(stale)

    def _trim_copies(self, user_id: str) -> None:
        """Keep this host's `keep_copies` newest copies of a user, and no stale temp dir."""
        udir = self.version_dir(user_id, 1).parent
        try:
            entries = list(udir.iterdir())
        except FileNotFoundError:
            return
        copies = sorted((int(p.name[1:]), p) for p in entries if _COPY_DIR.fullmatch(p.name))
        for _, path in copies[: -self.keep_copies]:
            shutil.rmtree(path, ignore_errors=True)
        newest = copies[-1][0] if copies else 0
        for p in entries:
            m = _TEMP_DIR.fullmatch(p.name)
            if m and int(m.group(1)) < newest and time.time() - p.stat().st_mtime > 60:
                shutil.rmtree(p, ignore_errors=True)

    def retire(self, user_id: str, versions: Iterable[int]) -> list[int]:
        """Delete these versions (those not there are skipped): each manifest goes first,
        so the version leaves the listing whole, then its files and this host's copy."""
        committed, files = self._objects(user_id)
        removed = sorted(set(versions) & committed)
        if not removed:
            return []
        self._delete([self._manifest_key(user_id, v) for v in removed])
        gone = set(removed)
        self._delete([key for v, key in files if v in gone])
        for v in removed:
            shutil.rmtree(self.version_dir(user_id, v), ignore_errors=True)
        return removed

    def delete_user(self, user_id: str) -> bool:
        """Remove every version of a user: manifests first, then the rest, then the copies."""
        prefix = self._user_prefix(user_id)
        keys = [o["Key"] for o in self._list(prefix)]
        manifests = [k for k in keys if k.endswith(MANIFEST_SUFFIX)]
        self._delete(manifests)
        self._delete([k for k in keys if not k.endswith(MANIFEST_SUFFIX)])
        shutil.rmtree(self.version_dir(user_id, 1).parent, ignore_errors=True)
        return bool(keys)

    def sync_user(self, user_id: str) -> None:
        """Nothing to do: an acknowledged PUT is durable."""


def _checked(version: int) -> int:
    if version < 1:
        raise ValueError(f"adapter versions start at 1, got {version}")
    return version


def make_client() -> Any:
    """A boto3 S3 client configured from the environment (see the module), with retries
    and timeouts bounded so that a dead endpoint fails a call in seconds, not minutes."""
    import boto3
    from botocore.config import Config

    # Path-style requests for a custom endpoint: MinIO, SeaweedFS and the like are often
    # reached by a name (or an IP) that has no per-bucket subdomains.
    custom = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    config = Config(
        connect_timeout=5,
        read_timeout=30,
        retries={"mode": "standard", "max_attempts": 4},
        s3={"addressing_style": "path" if custom else "auto"},
    )
    return boto3.session.Session().client("s3", config=config)
