"""kill -9 of a real `loraloop learn` process in the middle of an update, three times, then a
restart: every feedback event is applied exactly once, serving only ever sees whole
versions, never an older one than it served, and a version written just before a kill is
announced by the learner that replays after it.

The crash points (loraloop/core/fault_points.py), one per killed learner, each after a new round
of events:
- learner.after_step: a batched step done in memory, nothing written;
- learner.before_commit: versions written and announced, offsets not committed;
- learner.after_write: a version renamed into the store, its AdapterUpdated not sent.
The last learner is restarted without new events: its replay must skip what was applied
and announce the version the last kill hid from serving.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.faults.crash_support import (
    USERS,
    announced_versions,
    audit,
    catch_up,
    check_serving,
    crash_world,
    kill_at,
)

pytestmark = pytest.mark.kafka

CRASHES = ("learner.after_step@1", "learner.before_commit@1", "learner.after_write@2")


def test_learner_killed_mid_update_applies_every_event_exactly_once(
    kafka_bootstrap: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    hidden: dict[str, int] = {}  # user -> version the after_write kill left unannounced
    with crash_world(kafka_bootstrap, tmp_path) as world:
        settings, store, stream = world.settings, world.store, world.stream
        for i, point in enumerate(CRASHES):
            stream.round(f"r{i}")
            ran = kill_at(settings, monkeypatch, point, world.marker)
            check_serving(world.client, store, world.served)
            behind = {
                u: (store.versions(u) or [0])[-1] - announced_versions(settings).get(u, 0)
                for u in USERS
            }
            if point.startswith("learner.after_write"):
                # the kill caught a version that is in the store but not announced
                hidden = {u: store.versions(u)[-1] for u, gap in behind.items() if gap > 0}
                assert hidden, behind
            print(f"killed at {point} after {ran:.1f} s; store ahead of topic: {behind}")
        seconds, metrics = catch_up(settings, monkeypatch, world.marker, stream, store)
        check_serving(world.client, store, world.served)

    result = audit(store, stream.produced)
    skipped = metrics["loraloop_learner_samples_skipped_total{reason=already_applied}"]
    reannounced = metrics["loraloop_learner_versions_reannounced_total"]
    print(
        f"learner killed {len(CRASHES)}x mid-update: {stream.records} events produced "
        f"({stream.samples} samples), {result.applied} applied in {result.versions} versions, "
        f"duplicates {result.duplicates}, lost {result.lost}; last restart: {skipped:.0f} "
        f"replayed samples skipped, {reannounced:.0f} versions re-announced, caught up in "
        f"{seconds:.1f} s (process start, model load and group rejoin included)"
    )
    assert result.duplicates == 0 and result.lost == 0 and result.unknown == 0
    assert result.applied == stream.samples
    assert skipped > 0  # the last kill left applied samples uncommitted: the replay skipped them
    # every user's newest version is announced, the ones the after_write kill hid included:
    # their samples were all applied, so no newer version came to announce them instead
    assert announced_versions(settings) == {u: store.versions(u)[-1] for u in USERS}
    assert all(store.versions(u)[-1] == v for u, v in hidden.items()), hidden
    assert reannounced >= len(hidden)
    assert all(not store.partial_writes(u) for u in USERS)
