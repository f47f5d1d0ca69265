"""The host-RAM tier of the adapter cache: engine slots ← this LRU ← the adapter store.

Engine slots are few (they cost accelerator memory and batch width); the store holds every
version ever written. In between, loaded adapter versions (`LoRAWeights`) stay in host RAM,
least recently used first out, within a byte budget and an entry cap, so a user returning
within minutes never touches the disk. A version is immutable, so a cached copy is never
stale: a new version is a new key, and the old one ages out.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from pathlib import Path

from loraloop.core.adapters.peft_format import read_peft_dir
from loraloop.core.adapters.version import AdapterVersion
from loraloop.core.multi_lora import LoRAWeights

CacheKey = tuple[str, int]  # (user_id, version)


def adapter_bytes(weights: LoRAWeights) -> int:
    """Host memory taken by an adapter's tensors."""
    tensors = [*weights.a.values(), *weights.b.values()]
    return sum(t.numel() * t.element_size() for t in tensors)


class HostAdapterCache:
    """Thread-safe LRU of loaded adapter versions, bounded by bytes and by count."""

    def __init__(
        self,
        max_bytes: int,
        max_entries: int,
        read: Callable[[Path], LoRAWeights] = read_peft_dir,
        recent_loads: int = 4096,
    ) -> None:
        if max_bytes < 1 or max_entries < 1:
            raise ValueError("the host adapter cache needs a positive byte budget and entry cap")
        self.max_bytes, self.max_entries = max_bytes, max_entries
        self._read = read
        self._entries: OrderedDict[CacheKey, tuple[LoRAWeights, int]] = OrderedDict()
        self._lock = threading.Lock()
        self.bytes = 0
        self.hits = self.misses = self.evictions = 0
        self.load_seconds: deque[float] = deque(maxlen=recent_loads)  # recent store reads

    def get(self, ref: AdapterVersion) -> LoRAWeights:
        """The adapter version `ref`, from RAM or else read from the store (and kept).

        Raises ValueError/OSError (from the reader) when the version is unreadable; nothing
        is cached then."""
        key = (ref.user_id, ref.version)
        with self._lock:
            entry = self._entries.get(key)
            if entry is not None:
                self.hits += 1
                self._entries.move_to_end(key)
                return entry[0]
            self.misses += 1
        start = time.perf_counter()
        weights = self._read(ref.path)  # outside the lock: a slow disk must not stall hits
        self.load_seconds.append(time.perf_counter() - start)
        self.put(key, weights)
        return weights

    def put(self, key: CacheKey, weights: LoRAWeights) -> None:
        """Keep `weights` under `key` (e.g. prefetched), evicting the LRU beyond the budget."""
        size = adapter_bytes(weights)
        with self._lock:
            old = self._entries.pop(key, None)
            if old is not None:
                self.bytes -= old[1]
            if size > self.max_bytes:
                return  # larger than the whole budget: serve it, don't keep it
            self._entries[key] = (weights, size)
            self.bytes += size
            while self.bytes > self.max_bytes or len(self._entries) > self.max_entries:
                _, (_, freed) = self._entries.popitem(last=False)
                self.bytes -= freed
                self.evictions += 1

    def __contains__(self, key: CacheKey) -> bool:
        with self._lock:
            return key in self._entries

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)

    def drop_user(self, user_id: str) -> None:
        """Forget every cached version of a deleted user."""
        with self._lock:
            for key in [k for k in self._entries if k[0] == user_id]:
                self.bytes -= self._entries.pop(key)[1]

    @property
    def hit_rate(self) -> float:
        total = self.hits + self.misses
        return self.hits / total if total else 0.0
