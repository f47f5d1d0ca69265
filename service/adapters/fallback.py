"""Serve a request with an older adapter version when its own does not load.

A version can be unreadable on disk (truncated, corrupt, failing its checksum) even though
it was announced. The engine reports that as AdapterLoadError before it produces a token;
the registry then marks the version unservable (for good on an integrity error, for a
short while on a transient one; logged, counted in
`loraloop_server_adapter_versions_rejected_total`) and names what to serve instead: the
newest older version that loads, down to the base model, which always loads. The response
reports the version it was actually generated with. The registry lists the store to find
the older version, so it runs in a worker thread, off the event loop.

With a remote store (S3) a version is fetched into this host's copy before the engine
reads it, in a worker thread; a fetch that fails its checksum or finds the version
incomplete is an integrity error, one that cannot reach the store a transient one, and
both fall back the same way.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from loraloop.core.adapters.store import AdapterStoreError
from loraloop.core.adapters.version import ADAPTER_WEIGHTS, AdapterVersion
from loraloop.service.adapters.registry import AdapterRegistry
from loraloop.service.engines.protocol import (
    AdapterLoadError,
    Engine,
    GenerationRequest,
    GenerationResult,
    TokenChunk,
)

MAX_FALLBACKS = 8  # older versions tried before answering with the error


async def _reject(
    registry: AdapterRegistry, ref: AdapterVersion, err: AdapterLoadError
) -> AdapterVersion | None:
    return await asyncio.to_thread(registry.reject, ref, str(err), err.transient)


async def _fetched(registry: AdapterRegistry, request: GenerationRequest) -> None:
    """Fetch `request.adapter` when the store is remote; AdapterLoadError when it fails."""
    ref = request.adapter
    if ref is None or registry.local or (ref.path / ADAPTER_WEIGHTS).is_file():
        return  # (a remote version's copy is complete once its weights are in place)
    try:
        await asyncio.to_thread(registry.fetch, ref)
    except AdapterStoreError as exc:
        raise AdapterLoadError(f"fetching {ref.user_id} v{ref.version}: {exc}") from exc
    except OSError as exc:
        raise AdapterLoadError(
            f"fetching {ref.user_id} v{ref.version}: {exc}", transient=True
        ) from exc


async def generate(
    engine: Engine, registry: AdapterRegistry, request: GenerationRequest
) -> GenerationResult:
    """`engine.generate`, falling back (in `request.adapter`) past versions that fail to load."""
    for _ in range(MAX_FALLBACKS):
        try:
            await _fetched(registry, request)
            return await engine.generate(request)
        except AdapterLoadError as err:
            if request.adapter is None:
                raise
            request.adapter = await _reject(registry, request.adapter, err)
    return await engine.generate(request)


async def stream(
    engine: Engine, registry: AdapterRegistry, request: GenerationRequest
) -> AsyncIterator[TokenChunk]:
    """`engine.stream` with the same fallback (the error always comes before a token)."""
    for attempt in range(MAX_FALLBACKS + 1):
        started = False
        try:
            await _fetched(registry, request)
            async for chunk in engine.stream(request):
                started = True
                yield chunk
            return
        except AdapterLoadError as err:
            if started or request.adapter is None or attempt == MAX_FALLBACKS:
                raise
            request.adapter = await _reject(registry, request.adapter, err)
