"""AppliedOffsets: which interactions a user's versions learnt from, by Kafka position."""

from __future__ import annotations

from loraloop.learner.applied import AppliedOffsets


def test_applied_out_of_order_and_floor_covers_everything_below() -> None:
    applied = AppliedOffsets().with_applied([("i", 0, 7)], {("i", 0): 5})
    assert applied.contains(("i", 0, 7))
    assert applied.contains(("i", 0, 4))  # below the safe point when v was written: done
    assert not applied.contains(("i", 0, 5))  # still held then (waiting for its feedback)
    assert not applied.contains(("i", 0, 8))
    assert not applied.contains(("i", 1, 4))  # another partition has a floor of its own

    later = applied.with_applied([("i", 0, 5)], {("i", 0): 5})
    assert later.contains(("i", 0, 5)) and later.contains(("i", 0, 7))
    assert not applied.contains(("i", 0, 5))  # the earlier record is unchanged


def test_raising_the_floor_prunes_offsets_below_it() -> None:
    applied = AppliedOffsets().with_applied([("i", 0, 3), ("i", 0, 9)], {("i", 0): 2})
    assert applied.above == {"i:0": {3, 9}}
    raised = applied.with_applied([("i", 0, 12)], {("i", 0): 10, ("f", 0): 40})
    assert raised.floor == {"i:0": 10}  # partitions the user has nothing on are not kept
    assert raised.above == {"i:0": {12}}
    assert all(raised.contains(("i", 0, o)) for o in (0, 3, 9, 12))
    assert not raised.contains(("i", 0, 11))


def test_json_round_trip_and_garbage() -> None:
    applied = AppliedOffsets().with_applied([("i", 1, 30), ("i", 0, 2)], {("i", 1): 25})
    assert AppliedOffsets.from_json(applied.to_json()) == applied
    assert applied.to_json() == {
        "i:0": {"floor": 0, "above": [2]},
        "i:1": {"floor": 25, "above": [30]},
    }
    assert AppliedOffsets.from_json(None) == AppliedOffsets()
    assert AppliedOffsets.from_json({"i:0": "junk"}) == AppliedOffsets()
