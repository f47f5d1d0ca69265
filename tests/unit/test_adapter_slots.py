"""AdapterSlots: an LRU of adapter versions over the bank's slots 1..n-1."""

from __future__ import annotations

import pytest

from loraloop.core.multi_lora import LoRAWeights
from loraloop.service.adapters.slots import AdapterSlots


class Recorder:
    """Stands in for LoRABank.load: remembers which weights each slot holds."""

    def __init__(self) -> None:
        self.slots: dict[int, LoRAWeights] = {}
        self.loads: list[tuple[int, LoRAWeights]] = []

    def __call__(self, slot: int, weights: LoRAWeights) -> None:
        self.loads.append((slot, weights))
        self.slots[slot] = weights


def w(tag: float) -> LoRAWeights:
    return LoRAWeights(rank=1, alpha=tag)


def reader(tag: float, calls: list | None = None):
    def read() -> LoRAWeights:
        if calls is not None:
            calls.append(tag)
        return w(tag)

    return read


def test_miss_then_hit() -> None:
    rec = Recorder()
    slots = AdapterSlots(4, rec)  # slots 1..3
    calls: list = []
    s = slots.acquire(("alice", 1), reader(1.0, calls), set())
    assert s in (1, 2, 3)
    assert (slots.hits, slots.misses, slots.evictions) == (0, 1, 0)
    assert rec.slots[s].alpha == 1.0
    assert slots.acquire(("alice", 1), reader(99.0, calls), set()) == s
    assert (slots.hits, slots.misses, slots.evictions) == (1, 1, 0)
    assert calls == [1.0]  # a hit never reads nor loads again
    assert len(rec.loads) == 1
    assert len(slots) == 1


def test_never_uses_the_base_slot_and_fills_distinct_slots() -> None:
    rec = Recorder()
    slots = AdapterSlots(4, rec)
    got = [slots.acquire((u, 1), reader(i), set()) for i, u in enumerate("abc")]
    assert sorted(got) == [1, 2, 3]
    assert 0 not in rec.slots
    assert slots.evictions == 0 and slots.misses == 3 and len(slots) == 3


def test_new_version_is_a_different_key() -> None:
    rec = Recorder()
    slots = AdapterSlots(4, rec)
    s1 = slots.acquire(("alice", 1), reader(1), set())
    s2 = slots.acquire(("alice", 2), reader(2), set())
    assert s1 != s2 and slots.misses == 2
    assert rec.slots[s1].alpha == 1 and rec.slots[s2].alpha == 2


def test_evicts_least_recently_used() -> None:
    rec = Recorder()
    slots = AdapterSlots(3, rec)  # two usable slots
    sa = slots.acquire(("a", 1), reader(1), set())
    sb = slots.acquire(("b", 1), reader(2), set())
    slots.acquire(("a", 1), reader(1), set())  # a is now most recent
    sc = slots.acquire(("c", 1), reader(3), set())
    assert sc == sb  # b was the LRU
    assert slots.evictions == 1
    assert rec.slots[sc].alpha == 3
    # a is still resident (a hit), b was evicted (a miss again)
    hits, misses = slots.hits, slots.misses
    assert slots.acquire(("a", 1), reader(1), set()) == sa
    assert slots.hits == hits + 1
    slots.acquire(("b", 1), reader(2), set())
    assert slots.misses == misses + 1
    assert slots.evictions == 2
    assert len(slots) == 2


def test_pinned_slots_are_never_evicted() -> None:
    rec = Recorder()
    slots = AdapterSlots(4, rec)
    sa = slots.acquire(("a", 1), reader(1), set())
    sb = slots.acquire(("b", 1), reader(2), set())
    sc = slots.acquire(("c", 1), reader(3), set())
    # a is the LRU but pinned by the running batch; so is b: c must go
    sd = slots.acquire(("d", 1), reader(4), {sa, sb})
    assert sd == sc
    assert rec.slots[sa].alpha == 1 and rec.slots[sb].alpha == 2 and rec.slots[sd].alpha == 4
    # both pinned ones still hit
    assert slots.acquire(("a", 1), reader(1), set()) == sa
    assert slots.acquire(("b", 1), reader(2), set()) == sb


def test_all_pinned_raises_and_changes_nothing() -> None:
    rec = Recorder()
    slots = AdapterSlots(3, rec)
    sa = slots.acquire(("a", 1), reader(1), set())
    sb = slots.acquire(("b", 1), reader(2), set())
    loads = len(rec.loads)
    with pytest.raises(RuntimeError, match="pinned"):
        slots.acquire(("c", 1), reader(3), {sa, sb})
    assert len(rec.loads) == loads
    assert slots.evictions == 0
    assert slots.acquire(("a", 1), reader(1), set()) == sa
    assert slots.acquire(("b", 1), reader(2), set()) == sb
    assert len(slots) == 2


def test_read_failure_leaves_state_unchanged() -> None:
    rec = Recorder()
    slots = AdapterSlots(3, rec)
    sa = slots.acquire(("a", 1), reader(1), set())

    def broken() -> LoRAWeights:
        raise ValueError("corrupt adapter")

    for _ in range(5):  # repeated failures must not leak slots
        with pytest.raises(ValueError, match="corrupt"):
            slots.acquire(("bad", 1), broken, set())
    assert len(slots) == 1
    assert len(rec.loads) == 1
    assert slots.evictions == 0
    # the free slot is still free: a new adapter takes it without evicting a
    sb = slots.acquire(("b", 1), reader(2), set())
    assert sb != sa and slots.evictions == 0
    assert slots.acquire(("a", 1), reader(1), set()) == sa


def test_read_failure_when_full_does_not_evict() -> None:
    rec = Recorder()
    slots = AdapterSlots(3, rec)
    sa = slots.acquire(("a", 1), reader(1), set())
    sb = slots.acquire(("b", 1), reader(2), set())

    def broken() -> LoRAWeights:
        raise OSError("gone")

    with pytest.raises(OSError):
        slots.acquire(("bad", 1), broken, set())
    assert slots.evictions == 0
    hits = slots.hits
    assert slots.acquire(("a", 1), reader(1), set()) == sa
    assert slots.acquire(("b", 1), reader(2), set()) == sb
    assert slots.hits == hits + 2


def test_load_failure_does_not_leak_the_slot() -> None:
    def load_into(slot: int, weights: LoRAWeights) -> None:
        if weights.alpha < 0:
            raise ValueError("adapter rank 16 exceeds the bank's rank 8: raise lora_rank")

    slots = AdapterSlots(3, load_into)  # two usable slots
    for _ in range(2):
        with pytest.raises(ValueError):
            slots.acquire(("too-big", 1), reader(-1.0), set())
    # both usable slots must still be available to good adapters
    s1 = slots.acquire(("a", 1), reader(1), set())
    s2 = slots.acquire(("b", 1), reader(2), set())
    assert {s1, s2} == {1, 2}


def test_drop_user_frees_their_slots() -> None:
    rec = Recorder()
    slots = AdapterSlots(4, rec)
    sa1 = slots.acquire(("alice", 1), reader(1), set())
    sa2 = slots.acquire(("alice", 2), reader(2), set())
    sb = slots.acquire(("bob", 1), reader(3), set())
    slots.drop_user("alice")
    assert len(slots) == 1
    # alice's versions are gone: acquiring again is a miss, and fills freed slots
    # without evicting bob
    misses = slots.misses
    s = slots.acquire(("alice", 2), reader(2), set())
    assert slots.misses == misses + 1
    assert s in (sa1, sa2)
    carol = slots.acquire(("carol", 1), reader(4), set())
    assert carol in (sa1, sa2) and carol != s
    assert slots.evictions == 0
    assert slots.acquire(("bob", 1), reader(3), set()) == sb
    slots.drop_user("nobody")
    assert len(slots) == 3


def test_all_pinned_reads_nothing_and_counts_no_miss() -> None:
    """While every slot serves a running row, a waiting adapter is not read (again and
    again, each decoding step) nor counted as a miss: the caller just waits."""
    rec = Recorder()
    slots = AdapterSlots(3, rec)
    pinned = {slots.acquire(("a", 1), reader(1), set()), slots.acquire(("b", 1), reader(2), set())}
    calls: list = []
    misses = slots.misses
    for _ in range(5):
        with pytest.raises(RuntimeError, match="pinned"):
            slots.acquire(("c", 1), reader(3, calls), pinned)
    assert calls == [] and slots.misses == misses
