"""Open the adapter store that settings name: a directory, or an S3 bucket."""

from __future__ import annotations

from pathlib import Path
from urllib.parse import urlparse
from urllib.request import url2pathname

from loraloop.core.adapters.protocol import VersionStore
from loraloop.core.adapters.store import AdapterStore
from loraloop.core.settings import Settings, StartupError


class AdapterStoreConfigError(StartupError, ValueError):
    """adapter_store_uri names a store this build cannot open."""


def open_adapter_store(settings: Settings) -> VersionStore:
    """The store of `settings.adapter_store_uri`, else the directory `adapter_store`.

    Raises AdapterStoreConfigError for a URI that is not file:// or s3://, or when the
    bucket does not answer (serve and learn stop with its message)."""
    uri = settings.adapter_store_uri.strip()
    if not uri:
        return AdapterStore(settings.adapter_store)
    scheme = urlparse(uri).scheme
    if scheme == "file":
        return AdapterStore(Path(url2pathname(urlparse(uri).path)))
    if scheme == "s3":
        from loraloop.core.adapters.s3_store import S3AdapterStore

        cache = settings.adapter_cache_dir or settings.cache_dir.expanduser() / "adapter-copies"
        try:
            return S3AdapterStore(uri, cache)
        except (ValueError, OSError) as exc:  # a bad URI, a bucket that does not answer
            raise AdapterStoreConfigError(f"LORALOOP_ADAPTER_STORE_URI={uri!r}: {exc}") from exc
    raise AdapterStoreConfigError(
        f"LORALOOP_ADAPTER_STORE_URI={uri!r}: use file:///path or s3://bucket/prefix"
    )
