"""HostAdapterCache: the host-RAM tier between engine slots and the adapter store."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from loraloop.core.adapters.version import AdapterVersion
from loraloop.core.multi_lora import LoRAWeights
from loraloop.service.adapters.host_cache import HostAdapterCache, adapter_bytes
from loraloop.service.adapters.slots import AdapterSlots, SlotsPinned

KIB = 1024


def weights(kib: int = 1) -> LoRAWeights:
    w = LoRAWeights(1, 1.0)
    w.a["m"] = torch.zeros(kib * KIB // 8)  # float32: half the bytes in A, half in B
    w.b["m"] = torch.zeros(kib * KIB // 8)
    return w


class Store:
    def __init__(self) -> None:
        self.reads: list[Path] = []

    def __call__(self, path: Path) -> LoRAWeights:
        self.reads.append(path)
        if path.name == "bad":
            raise ValueError("corrupt adapter")
        return weights()


def ref(user: str, version: int = 1) -> AdapterVersion:
    return AdapterVersion(user, version, Path(f"/store/{user}/v{version}"))


def test_hits_skip_the_store_and_lru_evicts_by_bytes() -> None:
    store = Store()
    cache = HostAdapterCache(max_bytes=2 * KIB, max_entries=100, read=store)
    assert adapter_bytes(weights()) == KIB
    cache.get(ref("a"))
    cache.get(ref("b"))
    cache.get(ref("a"))  # a is now the most recent
    assert (cache.hits, cache.misses, len(store.reads)) == (1, 2, 2)
    cache.get(ref("c"))  # over budget: b (LRU) goes
    assert ("b", 1) not in cache and ("a", 1) in cache and ("c", 1) in cache
    assert cache.evictions == 1 and cache.bytes == 2 * KIB
    assert len(cache.load_seconds) == 3


def test_entry_cap_versions_and_drop_user() -> None:
    cache = HostAdapterCache(max_bytes=10**9, max_entries=2, read=Store())
    cache.get(ref("a", 1))
    cache.get(ref("a", 2))  # a new version is a new entry
    cache.get(ref("b", 1))
    assert len(cache) == 2 and ("a", 1) not in cache
    cache.drop_user("a")
    assert len(cache) == 1 and cache.bytes == KIB


def test_unreadable_version_is_not_cached() -> None:
    store = Store()
    cache = HostAdapterCache(max_bytes=10 * KIB, max_entries=10, read=store)
    bad = AdapterVersion("x", 1, Path("/store/x/bad"))
    for _ in range(2):
        with pytest.raises(ValueError, match="corrupt"):
            cache.get(bad)
    assert len(cache) == 0 and len(store.reads) == 2


def test_bad_budget_is_refused() -> None:
    with pytest.raises(ValueError, match="positive"):
        HostAdapterCache(max_bytes=0, max_entries=1)


def test_slots_never_hand_out_a_dropped_slot_that_a_running_row_uses() -> None:
    loads: dict[int, float] = {}
    slots = AdapterSlots(3, lambda s, w: loads.__setitem__(s, w.alpha))  # slots 1, 2
    sa = slots.acquire(("a", 1), lambda: LoRAWeights(1, 1.0), set())
    slots.drop_user("a")  # a's request may still be decoding in slot sa
    sb = slots.acquire(("b", 1), lambda: LoRAWeights(1, 2.0), {sa})
    assert sb != sa and loads[sa] == 1.0
    with pytest.raises(SlotsPinned):
        slots.acquire(("c", 1), lambda: LoRAWeights(1, 3.0), {sa, sb})
