"""Which adapter version lives in which engine slot: an LRU over the bank's slots."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable

from loraloop.core.multi_lora import BASE_SLOT, LoRAWeights

SlotKey = tuple[str, int]  # (user_id, version)


class SlotsPinned(RuntimeError):
    """Every slot holds an adapter that a running row uses: nothing can be evicted now."""


class AdapterSlots:
    """Assigns slots 1..n-1 to adapter versions, evicting the least recently used one
    that the running batch does not pin. Loading a resident version is a no-op."""

    def __init__(self, slots: int, load_into: Callable[[int, LoRAWeights], None]) -> None:
        self._free = list(range(slots - 1, BASE_SLOT, -1))
        self._resident: OrderedDict[SlotKey, int] = OrderedDict()
        self._load_into = load_into
        self.hits = self.misses = self.evictions = 0

    def acquire(self, key: SlotKey, read: Callable[[], LoRAWeights], pinned: set[int]) -> int:
        """The slot holding `key`, loading it with `read()` on a miss."""
        slot = self._resident.get(key)
        if slot is not None:
            self.hits += 1
            self._resident.move_to_end(key)
            return slot
        # Find room before reading anything: when every slot serves a running row, the
        # caller waits, and nothing is read or counted again and again meanwhile.
        free = next((s for s in reversed(self._free) if s not in pinned), None)
        victim = None
        if free is None:
            victim = next((k for k, s in self._resident.items() if s not in pinned), None)
            if victim is None:
                raise SlotsPinned("every adapter slot is pinned: raise adapter_slots")
        self.misses += 1
        weights = read()  # may raise: nothing has changed yet
        if free is not None:
            # A slot freed by drop_user may still serve a running row: never that one.
            self._free.remove(free)
            slot = free
        else:
            assert victim is not None
            slot = self._resident.pop(victim)
            self.evictions += 1
        try:
            self._load_into(slot, weights)
        except BaseException:
            self._free.append(slot)  # the slot's old content is gone either way
            raise
        self._resident[key] = slot
        return slot

    def drop_user(self, user_id: str) -> None:
        for key in [k for k in self._resident if k[0] == user_id]:
            self._free.append(self._resident.pop(key))

    def __len__(self) -> int:
        return len(self._resident)
