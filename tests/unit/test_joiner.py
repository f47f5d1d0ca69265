"""Joiner: interactions meet their feedback by request_id; commit offsets never skip
anything still held in memory."""

from __future__ import annotations

from loraloop.core.gen.loraloop.v1 import common_pb2, events_pb2
from loraloop.learner.joiner import Joiner

I_TOPIC, F_TOPIC = "interactions", "feedback"


def interaction(rid: str, user: str = "alice") -> events_pb2.Interaction:
    return events_pb2.Interaction(
        request_id=rid, user_id=user, prompt_token_ids=[1, 2], response_token_ids=[3]
    )


def feedback(rid: str, user: str = "alice", thumbs: int = 1) -> events_pb2.FeedbackEvent:
    return events_pb2.FeedbackEvent(
        request_id=rid, user_id=user, signals=common_pb2.FeedbackSignals(thumbs=thumbs)
    )


def ipos(offset: int, part: int = 0) -> tuple[str, int, int]:
    return (I_TOPIC, part, offset)


def fpos(offset: int, part: int = 0) -> tuple[str, int, int]:
    return (F_TOPIC, part, offset)


def test_interaction_then_feedback_joins() -> None:
    j = Joiner(wait_seconds=60)
    assert j.add_interaction(interaction("r1"), ipos(0)) is None
    assert j.pending == 1
    sample = j.add_feedback(feedback("r1", thumbs=-1), fpos(5))
    assert sample is not None
    assert sample.request_id == "r1" and sample.user_id == "alice"
    assert sample.interaction.response_token_ids == [3]
    assert sample.feedback.signals.thumbs == -1
    assert sample.positions == (ipos(0), fpos(5))
    assert j.pending == 0


def test_feedback_then_interaction_joins_with_same_shape() -> None:
    j = Joiner(wait_seconds=60)
    assert j.add_feedback(feedback("r1"), fpos(2)) is None
    assert j.pending == 1
    sample = j.add_interaction(interaction("r1"), ipos(7))
    assert sample is not None
    # positions are always (interaction, feedback), whichever came first
    assert sample.positions == (ipos(7), fpos(2))
    assert isinstance(sample.interaction, events_pb2.Interaction)
    assert isinstance(sample.feedback, events_pb2.FeedbackEvent)
    assert j.pending == 0


def test_unrelated_request_ids_do_not_join() -> None:
    j = Joiner(wait_seconds=60)
    assert j.add_interaction(interaction("r1"), ipos(0)) is None
    assert j.add_feedback(feedback("r2"), fpos(0)) is None
    assert j.pending == 2


def test_duplicates_are_counted_and_ignored() -> None:
    j = Joiner(wait_seconds=60)
    assert j.add_interaction(interaction("r1"), ipos(0)) is None
    assert j.add_interaction(interaction("r1"), ipos(1)) is None  # redelivery
    assert j.duplicates == 1
    assert j.pending == 1
    # the duplicate's offset is not held: only offset 0 blocks the commit
    assert j.commit_offsets()[(I_TOPIC, 0)] == 0
    sample = j.add_feedback(feedback("r1"), fpos(0))
    assert sample is not None
    assert sample.positions[0] == ipos(0)  # the first delivery is kept
    j.add_feedback(feedback("r9"), fpos(1))
    j.add_feedback(feedback("r9"), fpos(2))
    assert j.duplicates == 2
    j.release(sample.positions)
    assert j.commit_offsets() == {(I_TOPIC, 0): 2, (F_TOPIC, 0): 1}


def test_user_mismatch_is_dropped_and_released() -> None:
    j = Joiner(wait_seconds=60)
    assert j.add_interaction(interaction("r1", user="alice"), ipos(4)) is None
    assert j.add_feedback(feedback("r1", user="mallory"), fpos(9)) is None
    assert j.mismatched == 1
    assert j.pending == 0
    # both records are done: commits move past them
    assert j.commit_offsets() == {(I_TOPIC, 0): 5, (F_TOPIC, 0): 10}
    # the request is closed: a later feedback for it is a duplicate, not a new join
    assert j.add_feedback(feedback("r1", user="alice"), fpos(10)) is None
    assert j.duplicates == 1 and j.pending == 0


def stamped(event, ms: int):
    event.timestamp_ms = ms
    return event


def test_expire_closes_windows_by_event_time() -> None:
    j = Joiner(wait_seconds=10)
    j.add_interaction(stamped(interaction("r1"), 1_000), ipos(3))
    j.add_feedback(stamped(feedback("r2"), 2_000), fpos(8))
    j.add_interaction(stamped(interaction("r3"), 3_000), ipos(4))
    assert j.commit_offsets() == {(I_TOPIC, 0): 3, (F_TOPIC, 0): 8}
    assert j.expire() == []  # stream time is 3 s: every window is still open
    assert j.expire(now_ms=11_000) == []  # r1 waited exactly 10 s: still open
    unanswered = j.expire(now_ms=13_500)
    # interactions come back as samples without feedback (default reward or drop: the
    # learner's rule); the orphaned feedback r2 is released at once
    assert sorted(s.request_id for s in unanswered) == ["r1", "r3"]
    assert all(s.feedback is None for s in unanswered)
    assert (j.expired, j.orphaned, j.pending) == (2, 1, 0)
    assert j.commit_offsets() == {(I_TOPIC, 0): 3, (F_TOPIC, 0): 9}
    j.release(unanswered[0].positions + unanswered[1].positions)
    assert j.commit_offsets() == {(I_TOPIC, 0): 5, (F_TOPIC, 0): 9}
    # feedback for an expired interaction is late: counted and dropped, offset not held
    assert j.add_feedback(stamped(feedback("r1"), 14_000), fpos(9)) is None
    assert (j.late, j.pending) == (1, 0)
    assert j.commit_offsets()[(F_TOPIC, 0)] == 10


def test_event_time_advances_with_the_newest_event() -> None:
    j = Joiner(wait_seconds=10)
    j.add_interaction(stamped(interaction("old"), 0), ipos(0))
    j.add_interaction(stamped(interaction("new"), 5_000), ipos(1))
    assert j.expire() == []
    # a feedback stamped 10.5 s moves stream time: only 'old' has waited > 10 s
    assert j.add_feedback(stamped(feedback("other"), 10_500), fpos(0)) is None
    (gone,) = j.expire()
    assert gone.request_id == "old"
    assert j.add_feedback(stamped(feedback("new"), 10_600), fpos(1)) is not None


def test_joined_request_redelivered_later_is_a_duplicate() -> None:
    j = Joiner(wait_seconds=60)
    j.add_interaction(interaction("r1"), ipos(0))
    assert j.add_feedback(feedback("r1"), fpos(0)) is not None
    assert j.add_feedback(feedback("r1"), fpos(1)) is None
    assert j.add_interaction(interaction("r1"), ipos(1)) is None
    assert (j.duplicates, j.pending) == (2, 0)
    assert j.commit_offsets() == {(I_TOPIC, 0): 0, (F_TOPIC, 0): 0}  # sample not released


def test_commit_never_passes_a_held_offset() -> None:
    j = Joiner(wait_seconds=60)
    # interaction at offset 3 waits for its feedback
    assert j.add_interaction(interaction("slow"), ipos(3)) is None
    # offsets 4..9 are joined and applied
    for off in range(4, 10):
        s = j.add_interaction(interaction(f"r{off}"), ipos(off)) or None
        assert s is None
        s = j.add_feedback(feedback(f"r{off}"), fpos(off - 4))
        assert s is not None
        j.release(s.positions)
    commits = j.commit_offsets()
    assert commits[(I_TOPIC, 0)] == 3
    assert commits[(F_TOPIC, 0)] == 6
    # its feedback arrives: held (a sample not yet applied) until released
    s = j.add_feedback(feedback("slow"), fpos(6))
    assert s is not None
    assert j.commit_offsets() == {(I_TOPIC, 0): 3, (F_TOPIC, 0): 6}
    j.release(s.positions)
    assert j.commit_offsets() == {(I_TOPIC, 0): 10, (F_TOPIC, 0): 7}


def test_unreleased_sample_holds_both_offsets() -> None:
    j = Joiner(wait_seconds=60)
    j.add_interaction(interaction("r1"), ipos(0))
    s = j.add_feedback(feedback("r1"), fpos(0))
    assert s is not None
    j.add_interaction(interaction("r2"), ipos(1))
    j.release((ipos(1),))  # releasing another offset does not free offset 0
    assert j.commit_offsets() == {(I_TOPIC, 0): 0, (F_TOPIC, 0): 0}


def test_partitions_are_independent_and_seen_advances() -> None:
    j = Joiner(wait_seconds=60)
    j.add_interaction(interaction("p0"), ipos(5, part=0))
    j.seen(ipos(20, part=1))  # a skipped record
    j.seen(ipos(12, part=1))  # an older one never moves the watermark back
    assert j.commit_offsets() == {(I_TOPIC, 0): 5, (I_TOPIC, 1): 21}
    j.seen(ipos(6, part=0))
    assert j.commit_offsets()[(I_TOPIC, 0)] == 5  # still held by offset 5


def test_forget_user() -> None:
    j = Joiner(wait_seconds=60)
    j.add_interaction(interaction("a1", "alice"), ipos(0))
    j.add_feedback(feedback("a2", "alice"), fpos(0))
    j.add_interaction(interaction("b1", "bob"), ipos(1))
    assert j.pending == 3
    j.forget_user("alice")
    assert j.pending == 1
    assert j.commit_offsets() == {(I_TOPIC, 0): 1, (F_TOPIC, 0): 1}
    # alice's feedback for a1 no longer joins; bob's still does
    assert j.add_feedback(feedback("a1", "alice"), fpos(1)) is None
    s = j.add_feedback(feedback("b1", "bob"), fpos(2))
    assert s is not None and s.user_id == "bob"
    j.forget_user("nobody")  # unknown user: no-op
    assert j.pending == 1


def test_feedback_stamped_past_the_window_is_late_whenever_it_is_consumed() -> None:
    """The server answers accepted=false for feedback sent more than the wait after the
    request; the joiner drops it by the same timestamps, even in the batch where it could
    still have joined (it used to, when it came before the expiry ran)."""
    j = Joiner(wait_seconds=10)
    j.add_interaction(stamped(interaction("r1"), 1_000), ipos(0))
    assert j.add_feedback(stamped(feedback("r1"), 11_001), fpos(0)) is None
    assert (j.late, j.pending) == (1, 1)  # the interaction still waits (default reward)
    assert j.commit_offsets()[(F_TOPIC, 0)] == 1  # the late feedback is not held
    # reordered: the late feedback first, then its interaction
    j.add_feedback(stamped(feedback("r2"), 20_000), fpos(1))
    assert j.add_interaction(stamped(interaction("r2"), 9_000), ipos(1)) is None
    assert j.late == 2
    # exactly at the wait it still counts
    j.add_interaction(stamped(interaction("r3"), 20_000), ipos(2))
    assert j.add_feedback(stamped(feedback("r3"), 30_000), fpos(2)) is not None


def test_earliest_counts_the_first_feedback_only() -> None:
    j = Joiner(wait_seconds=60, aggregation="earliest")
    j.add_interaction(interaction("r1"), ipos(0))
    sample = j.add_feedback(feedback("r1", thumbs=1), fpos(0))
    assert sample is not None and [f.signals.thumbs for f in sample.feedbacks] == [1]
    assert j.add_feedback(feedback("r1", thumbs=-1), fpos(1)) is None
    assert j.add_feedback(feedback("r1", thumbs=1), fpos(2)) is None
    assert j.duplicates == 2


def test_sum_joins_every_feedback_of_the_window_when_it_closes() -> None:
    j = Joiner(wait_seconds=10, aggregation="sum")
    j.add_feedback(stamped(feedback("r1", thumbs=1), 1_500), fpos(0))  # before its interaction
    assert j.add_interaction(stamped(interaction("r1"), 1_000), ipos(0)) is None
    assert j.add_feedback(stamped(feedback("r1", thumbs=-1), 2_000), fpos(1)) is None
    assert j.add_feedback(stamped(feedback("r1", thumbs=-1), 2_000), fpos(2)) is None  # a copy
    assert j.add_feedback(stamped(feedback("r1", thumbs=1), 3_000), fpos(3)) is None
    assert j.add_feedback(stamped(feedback("r1", thumbs=1), 12_000), fpos(4)) is None  # late
    assert (j.duplicates, j.late) == (1, 1)
    assert j.expire(now_ms=10_000) == []  # still open
    (sample,) = j.expire(now_ms=11_001)
    assert [f.signals.thumbs for f in sample.feedbacks] == [1, -1, 1]
    assert sample.feedback is sample.feedbacks[0]
    assert sample.positions == (ipos(0), fpos(0), fpos(1), fpos(3))
    assert j.expired == 0 and j.pending == 0
    # every offset stays held until the learner releases the sample
    assert j.commit_offsets() == {(I_TOPIC, 0): 0, (F_TOPIC, 0): 0}
    j.release(sample.positions)
    assert j.commit_offsets() == {(I_TOPIC, 0): 1, (F_TOPIC, 0): 5}
    assert j.add_feedback(stamped(feedback("r1"), 5_000), fpos(5)) is None  # window closed
    assert j.late == 2


def test_sum_without_feedback_expires_and_orphans_are_released() -> None:
    j = Joiner(wait_seconds=10, aggregation="sum")
    j.add_interaction(stamped(interaction("lonely"), 1_000), ipos(0))
    j.add_feedback(stamped(feedback("nobody"), 1_000), fpos(0))
    (sample,) = j.expire(now_ms=20_000)
    assert sample.feedback is None and sample.feedbacks == ()
    assert (j.expired, j.orphaned, j.pending) == (1, 1, 0)
    j.add_feedback(stamped(feedback("gone", user="bob"), 1_000), fpos(1))
    j.forget_user("bob")
    assert j.pending == 0 and j.commit_offsets()[(F_TOPIC, 0)] == 2


def test_sum_tells_two_equal_votes_in_one_millisecond_from_a_redelivery() -> None:
    """Two Feedback calls can carry the same content within a millisecond: their
    feedback_id (set by the server per call) keeps both; a redelivery has the same id."""
    j = Joiner(wait_seconds=10, aggregation="sum")
    j.add_interaction(stamped(interaction("r1"), 1_000), ipos(0))
    for offset, fid in enumerate(("a", "b", "b")):
        event = stamped(feedback("r1", thumbs=1), 1_500)
        event.feedback_id = fid
        j.add_feedback(event, fpos(offset))
    (sample,) = j.expire(now_ms=20_000)
    assert [f.feedback_id for f in sample.feedbacks] == ["a", "b"] and j.duplicates == 1
