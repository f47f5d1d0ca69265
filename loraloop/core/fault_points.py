"""Named crash points, for fault tests only: stop a process dead at an exact point so a
test can `kill -9` it there.

Two environment variables, both unset outside fault tests:

- `LORALOOP_FAULT_PAUSE_AT=<point>` or `<point>@<n>`: the n-th time (default: the first)
  the process reaches `<point>`, it pauses there for good;
- `LORALOOP_FAULT_MARKER=<file>`: on pausing it writes `<point>` into this file, which is
  how the test knows when to send SIGKILL.

Points: `learner.after_step` (a batched step done in memory, nothing written),
`learner.after_write` (a version renamed into the store, its AdapterUpdated not yet sent),
`learner.before_commit` (versions written and announced, offsets not yet committed),
`store.mid_write` (part of a version's files written into its temporary directory),
`store.before_rename` (every file written and fsynced, the directory not yet renamed).

Unset, `pause_point` is one comparison with None: nothing is read or counted.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

POINTS = frozenset(
    {
        "learner.after_step",
        "learner.after_write",
        "learner.before_commit",
        "store.mid_write",
        "store.before_rename",
    }
)


def _target() -> tuple[str, int] | None:
    spec = os.environ.get("LORALOOP_FAULT_PAUSE_AT", "").strip()
    if not spec:
        return None
    name, _, nth = spec.partition("@")
    if name not in POINTS:
        raise ValueError(
            f"LORALOOP_FAULT_PAUSE_AT={spec!r}: unknown point; use one of {sorted(POINTS)}"
        )
    return name, int(nth) if nth else 1


_TARGET = _target()
_hits = 0


def pause_point(name: str) -> None:
    """Pause here for good if LORALOOP_FAULT_PAUSE_AT names this point (and hit count)."""
    if _TARGET is None or name != _TARGET[0]:
        return
    global _hits
    _hits += 1
    if _hits != _TARGET[1]:
        return
    marker = os.environ.get("LORALOOP_FAULT_MARKER")
    if marker:
        Path(marker).write_text(name)
    while True:  # until the test kills us
        time.sleep(3600)
