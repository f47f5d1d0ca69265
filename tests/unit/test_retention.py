"""Adapter retention: the rule (which versions may go), the learner's serving floor (when
an announcement is old enough), the rollback guard's targets, and the store's deletion."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from loraloop.core.adapters.retention import retired_versions
from loraloop.core.adapters.store import AdapterStore
from loraloop.core.adapters.version import ADAPTER_WEIGHTS, LEARNER_STATE
from loraloop.learner.retention import Retention


def _write(store: AdapterStore, user: str, version: int, best: int = 0) -> None:
    state: dict[str, Any] = {"guard": {"recent": [], "best_mean": None, "best_version": best}}
    store.write(user, version, {ADAPTER_WEIGHTS: b"w%d" % version}, state)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.mark.parametrize(
    ("versions", "keep", "floor", "protected", "retired"),
    [
        (range(1, 11), 3, 6, (), [1, 2, 3, 4, 5]),  # below the floor, not among the newest 3
        (range(1, 11), 3, 6, (2, 4), [1, 3, 5]),  # rollback targets stay
        (range(1, 11), 3, 10, (), [1, 2, 3, 4, 5, 6, 7]),  # the newest 3 stay whatever
        (range(1, 11), 3, 0, (), []),  # nothing announced long enough ago: nothing goes
        (range(1, 11), 0, 10, (), []),  # keep 0: retention off
        (range(1, 3), 3, 2, (), []),  # fewer than 3 versions
        ([2, 5, 9], 1, 9, (), [2, 5]),  # gaps (versions deleted before)
    ],
)
def test_the_retention_rule(
    versions: range | list[int], keep: int, floor: int, protected: tuple[int, ...], retired: list
) -> None:
    assert retired_versions(versions, keep, floor, protected) == retired


@given(
    st.sets(st.integers(1, 60)),
    st.integers(0, 8),
    st.integers(0, 70),
    st.sets(st.integers(0, 60)),
)
def test_the_rule_never_retires_the_newest_the_maybe_served_or_a_rollback_target(
    versions: set[int], keep: int, floor: int, protected: set[int]
) -> None:
    retired = retired_versions(versions, keep, floor, protected)
    newest = sorted(versions)[-keep:] if keep else sorted(versions)
    assert set(retired) <= versions
    assert not set(retired) & set(newest)  # the newest `keep` (every version for keep 0)
    assert all(v < floor for v in retired)  # never one a server may still serve
    assert not set(retired) & protected
    # and everything else goes
    rest = {v for v in versions if v < floor and v not in newest and v not in protected}
    assert set(retired) == rest if keep else retired == []


def test_nothing_is_deleted_before_a_newer_announcement_is_grace_old(tmp_path: Path) -> None:
    store, clock = AdapterStore(tmp_path / "store"), Clock()
    retention = Retention(store, keep_newest=1, grace_s=60, clock=clock)
    for v in range(1, 6):
        _write(store, "ann", v)
        retention.acknowledged("ann", v)
        clock.now += 10  # v1 at 1000, ..., v5 at 1040
    assert retention.ripe() == set()  # now 1050: no announcement is 60 s old
    clock.now = 1060  # v1 is 60 s old: the floor is v1, nothing below it
    assert retention.ripe() == {"ann"} and retention.floor("ann") == 1
    assert retention.prune("ann") == []
    clock.now = 1085  # v2 (at 1010) and v3 (1020) are 60 s old now, v4 (1030) not yet
    assert retention.ripe() == {"ann"} and retention.floor("ann") == 3
    assert retention.prune("ann") == [1, 2]  # v3, the floor, may be served still
    assert store.versions("ann") == [3, 4, 5]
    assert retention.ripe() == set()  # nothing rose since
    clock.now = 1200
    assert retention.ripe() == {"ann"} and retention.prune("ann") == [3, 4]
    assert store.versions("ann") == [5]  # the newest is kept, whatever its age


def test_rollback_targets_are_kept(tmp_path: Path) -> None:
    store, clock = AdapterStore(tmp_path / "store"), Clock()
    retention = Retention(store, keep_newest=2, grace_s=0, clock=clock)
    # the kept v9's learner state names v4 as the guard's best version, the kept v8 v2
    bests = {1: 0, 2: 0, 3: 0, 4: 2, 5: 4, 6: 4, 7: 4, 8: 2, 9: 4}
    for v, best in bests.items():
        _write(store, "ann", v, best)
        retention.acknowledged("ann", v)
    assert retention.ripe() == {"ann"} and retention.floor("ann") == 9
    assert retention.prune("ann") == [1, 3, 5, 6, 7]
    assert store.versions("ann") == [2, 4, 8, 9]  # v8, v9 the newest, v2 and v4 targets


def test_a_version_whose_state_does_not_read_names_no_target(tmp_path: Path) -> None:
    store, clock = AdapterStore(tmp_path / "store"), Clock()
    retention = Retention(store, keep_newest=2, grace_s=0, clock=clock)
    for v, best in {1: 0, 2: 0, 3: 1, 4: 1}.items():
        _write(store, "ann", v, best)
        retention.acknowledged("ann", v)
    (store.version_dir("ann", 4) / LEARNER_STATE).write_bytes(b"{truncated")
    retention.ripe()
    assert retention.prune("ann") == [2]  # v3's target v1 kept; v4's state names none


def test_a_restarted_learner_waits_for_its_own_announcements(tmp_path: Path) -> None:
    store, clock = AdapterStore(tmp_path / "store"), Clock()
    for v in range(1, 6):
        _write(store, "ann", v)
    retention = Retention(store, keep_newest=1, grace_s=60, clock=clock)  # no acks known
    clock.now += 3600
    assert retention.ripe() == set() and retention.prune("ann") == []
    assert store.versions("ann") == [1, 2, 3, 4, 5]


def test_retention_off_keeps_everything(tmp_path: Path) -> None:
    store, clock = AdapterStore(tmp_path / "store"), Clock()
    retention = Retention(store, keep_newest=0, grace_s=0, clock=clock)
    for v in range(1, 6):
        _write(store, "ann", v)
        retention.acknowledged("ann", v)
    assert retention.ripe() == set() and retention.prune("ann") == []
    assert store.versions("ann") == [1, 2, 3, 4, 5]


def test_a_deleted_user_starts_afresh(tmp_path: Path) -> None:
    store, clock = AdapterStore(tmp_path / "store"), Clock()
    retention = Retention(store, keep_newest=1, grace_s=10, clock=clock)
    for v in (1, 2, 3):
        retention.acknowledged("ann", v)
    clock.now += 10
    assert retention.ripe() == {"ann"} and retention.floor("ann") == 3
    retention.acknowledged("ann", 4)
    retention.forget("ann")
    clock.now += 10
    assert retention.ripe() == set() and retention.floor("ann") == 0


def test_floors_are_bounded(tmp_path: Path) -> None:
    clock = Clock()
    retention = Retention(AdapterStore(tmp_path / "s"), 1, grace_s=0, clock=clock, capacity=2)
    for user in ("a", "b", "c"):
        retention.acknowledged(user, 5)
    assert retention.ripe() == {"b", "c"}  # "a" forgotten: it only waits for a later ack
    assert retention.floor("a") == 0 and retention.floor("c") == 5


def test_retire_takes_versions_out_of_the_listing_whole(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = AdapterStore(tmp_path / "store")
    for v in (1, 2, 3, 4):
        _write(store, "ann", v)
    assert store.retire("ann", [1, 7]) == [1]  # v7 is not there: skipped
    assert store.versions("ann") == [2, 3, 4]
    assert sorted(p.name for p in (store.root / "ann").iterdir()) == ["v2", "v3", "v4"]

    # A deletion that dies after the rename leaves no version half there: the leftover is
    # never listed, and the user's next write sweeps it like a half-written version.
    def crash(path: Path, *args: object, **kwargs: object) -> None:
        raise OSError("killed mid-delete")

    monkeypatch.setattr(shutil, "rmtree", crash)
    with pytest.raises(OSError, match="killed"):
        store.retire("ann", [2])
    monkeypatch.undo()
    assert store.versions("ann") == [3, 4]
    assert [p.name.split("-")[0] for p in store.partial_writes("ann")] == [".v2.retired"]
    _write(store, "ann", 5)
    assert store.partial_writes("ann") == [] and store.versions("ann") == [3, 4, 5]
