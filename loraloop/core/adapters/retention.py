"""Which of a user's adapter versions the store may delete.

Versions are immutable and a new one is written at every update, so the store grows
without bound unless old ones go. A version is deleted only when all of these hold:

- it is not among the user's newest `keep_newest` versions (the newest is always kept:
  the learner learns on from it; the ones before it are what serving falls back to when
  a version does not load);
- it is older than the *serving floor*: the newest version whose announcement Kafka
  acknowledged at least a grace period ago. Servers swap to an announced version as soon
  as they read it from adapter-updates (a restarted server rebuilds its view from that
  topic and the store), so once the grace has passed no server resolves an older version
  for that user, and versions at or above the floor may still be served and are kept;
- it is not protected: a version the rollback guard may return to (`best_version` in the
  learner state of a kept version).

`keep_newest` 0 keeps every version (no retention).
"""

from __future__ import annotations

from collections.abc import Iterable


def retired_versions(
    versions: Iterable[int], keep_newest: int, serving_floor: int, protected: Iterable[int] = ()
) -> list[int]:
    """The versions to delete, oldest first (see the module)."""
    if keep_newest <= 0:
        return []
    ordered = sorted(set(versions))
    kept = set(ordered[-keep_newest:]) | set(protected)
    return [v for v in ordered if v < serving_floor and v not in kept]
