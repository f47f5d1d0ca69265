"""kill -9 of a real `loraloop learn` process while it writes an adapter version, twice, then
a restart: what the killed writer left is never listed, never served, and swept by the next
write; every feedback event is applied exactly once.

The crash points (loraloop/core/fault_points.py):
- store.mid_write: part of the version's files written into its temporary directory;
- store.before_rename: every file written and fsynced, the directory not yet renamed.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.faults.crash_support import (
    USERS,
    audit,
    catch_up,
    check_serving,
    crash_world,
    kill_at,
)

pytestmark = pytest.mark.kafka

CRASHES = ("store.mid_write@2", "store.before_rename@3")


def test_learner_killed_while_writing_a_version_leaves_nothing_visible(
    kafka_bootstrap: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with crash_world(kafka_bootstrap, tmp_path) as world:
        settings, store, stream = world.settings, world.store, world.stream
        for i, point in enumerate(CRASHES):
            stream.round(f"r{i}")
            ran = kill_at(settings, monkeypatch, point, world.marker)
            partial = {u: [p.name for p in store.partial_writes(u)] for u in USERS}
            partial = {u: names for u, names in partial.items() if names}
            assert partial, "the kill should have left a half-written version behind"
            for user, names in partial.items():
                for name in names:  # `.v<N>.<random>`: v<N> is not a version (yet)
                    assert int(name.split(".")[1][1:]) not in store.versions(user)
            check_serving(world.client, store, world.served)  # whole versions, never older
            print(f"killed at {point} after {ran:.1f} s; half-written: {partial}")
        stream.round("final")
        seconds, _ = catch_up(settings, monkeypatch, world.marker, stream, store)
        check_serving(world.client, store, world.served)

    result = audit(store, stream.produced)
    print(
        f"learner killed {len(CRASHES)}x mid-write: {stream.records} events produced "
        f"({stream.samples} samples), {result.applied} applied in {result.versions} versions, "
        f"duplicates {result.duplicates}, lost {result.lost}; caught up in {seconds:.1f} s "
        "after the restart (process start, model load and group rejoin included)"
    )
    assert result.duplicates == 0 and result.lost == 0 and result.unknown == 0
    assert result.applied == stream.samples
    assert all(not store.partial_writes(u) for u in USERS)  # swept by the rewrite
