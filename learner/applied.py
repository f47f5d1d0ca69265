"""Which of a user's interactions a version has already learnt from, by Kafka position.

DESIGN §3 asks each user's state to record the last applied offset per partition, so that
a replay after a crash skips what was applied. A single "last offset" is not enough here:
samples are applied when their feedback arrives, so an interaction at offset 7 can be
applied before one at offset 5 that still waits for its feedback. The record is therefore,
per interactions partition:

- `floor`: every interaction of this user below it is done (learnt from in this or an
  earlier version, or dropped by a joiner rule). It is the learner's safe commit point of
  that partition when the version was written: the lowest offset it still held.
- `above`: the offsets at or above `floor` that this version or an earlier one learnt from.

An interaction at position p was applied iff p < floor or p in above. The record is stored
in the version's learner state, so it is written atomically with the weights it describes:
there is no moment at which one is on disk without the other.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

Position = tuple[str, int, int]  # (topic, partition, offset)


def _key(topic: str, partition: int) -> str:
    return f"{topic}:{partition}"


@dataclass
class AppliedOffsets:
    floor: dict[str, int] = field(default_factory=dict)  # "topic:partition" -> offset
    above: dict[str, set[int]] = field(default_factory=dict)

    def contains(self, pos: Position) -> bool:
        key = _key(pos[0], pos[1])
        return pos[2] < self.floor.get(key, 0) or pos[2] in self.above.get(key, ())

    def with_applied(
        self, positions: Iterable[Position], floors: Mapping[tuple[str, int], int]
    ) -> AppliedOffsets:
        """A new record with `positions` applied and floors raised to `floors` (the safe
        commit offsets, per partition, at the time of writing); what falls below a floor
        is dropped from `above`."""
        floor = dict(self.floor)
        above = {k: set(v) for k, v in self.above.items()}
        for topic, part, offset in positions:
            above.setdefault(_key(topic, part), set()).add(offset)
        for (topic, part), safe in floors.items():
            key = _key(topic, part)
            if key in above or key in floor:
                floor[key] = max(floor.get(key, 0), safe)
        for key in list(above):
            above[key] = {o for o in above[key] if o >= floor.get(key, 0)}
            if not above[key]:
                del above[key]
        return AppliedOffsets(floor, above)

    def to_json(self) -> dict[str, Any]:
        keys = sorted(set(self.floor) | set(self.above))
        return {
            k: {"floor": self.floor.get(k, 0), "above": sorted(self.above.get(k, ()))} for k in keys
        }

    @classmethod
    def from_json(cls, data: Any) -> AppliedOffsets:
        if not isinstance(data, dict):
            return cls()
        floor: dict[str, int] = {}
        above: dict[str, set[int]] = {}
        for key, item in data.items():
            if not isinstance(item, dict):
                continue
            if int(item.get("floor", 0)) > 0:
                floor[str(key)] = int(item["floor"])
            offsets = {int(o) for o in item.get("above", ())}
            if offsets:
                above[str(key)] = offsets
        return cls(floor, above)
