"""Preference pairs: the joiner joins a regenerate with the response it replaces and holds
its offset until the pair is done; the rules of learner/preferences.py make (or refuse)
the pairs; edits are tokenized as whole responses."""

from __future__ import annotations

from pathlib import Path

import pytest
from transformers import AutoTokenizer

from loraloop.core.gen.loraloop.v1 import common_pb2, events_pb2
from loraloop.learner.joiner import Joiner, Sample
from loraloop.learner.preferences import PairMaker, PreferenceConfig, turned_down

I_TOPIC, F_TOPIC = "interactions", "feedback"


def interaction(
    rid: str, ts: int, regenerates: str = "", user: str = "alice", response=(3, 4)
) -> events_pb2.Interaction:
    return events_pb2.Interaction(
        request_id=rid,
        user_id=user,
        timestamp_ms=ts,
        prompt_token_ids=[1, 2],
        response_token_ids=list(response),
        regenerates=regenerates,
    )


def feedback(rid: str, ts: int, user: str = "alice", **signals) -> events_pb2.FeedbackEvent:
    return events_pb2.FeedbackEvent(
        request_id=rid, user_id=user, timestamp_ms=ts, signals=common_pb2.FeedbackSignals(**signals)
    )


def ipos(offset: int) -> tuple[str, int, int]:
    return (I_TOPIC, 0, offset)


def fpos(offset: int) -> tuple[str, int, int]:
    return (F_TOPIC, 0, offset)


def test_a_regenerate_carries_the_replaced_interaction_and_holds_it() -> None:
    j = Joiner(wait_seconds=60, pair_regenerates=True)
    j.add_interaction(interaction("a", 1000), ipos(0))
    a = j.add_feedback(feedback("a", 1100, regenerated=True), fpos(0))
    assert a is not None and a.replaced is None
    j.release(a.positions)  # A learnt from: still held, B may pair with it
    assert j.commit_offsets()[(I_TOPIC, 0)] == 0
    j.add_interaction(interaction("b", 1200, regenerates="a", response=(5, 6)), ipos(1))
    b = j.add_feedback(feedback("b", 1300, thumbs=1), fpos(1))
    assert b is not None and b.replaced is not None
    assert b.replaced.request_id == "a" and not b.replaced_again
    assert b.positions == (ipos(1), fpos(1), ipos(0))
    j.release(b.positions)
    # A's own window still holds it (another interaction may regenerate it)
    assert j.commit_offsets()[(I_TOPIC, 0)] == 0
    j.expire(now_ms=1000 + 60_001)
    assert j.commit_offsets()[(I_TOPIC, 0)] == 1  # B's window holds B only
    j.expire(now_ms=1200 + 60_001)
    assert j.commit_offsets() == {(I_TOPIC, 0): 2, (F_TOPIC, 0): 2}


def test_a_pending_regenerate_holds_the_replaced_offset_past_its_window() -> None:
    j = Joiner(wait_seconds=60, pair_regenerates=True)
    j.add_interaction(interaction("a", 0), ipos(0))
    j.add_interaction(interaction("b", 50_000, regenerates="a"), ipos(1))
    expired = j.expire(now_ms=61_000)  # A's window closed, B waits for its feedback
    assert [s.request_id for s in expired] == ["a"]
    j.release(expired[0].positions)
    assert j.commit_offsets()[(I_TOPIC, 0)] == 0  # B's sample still needs A on a replay
    (b,) = j.expire(now_ms=111_000)
    assert b.replaced is not None and b.feedback is None
    j.release(b.positions)
    assert j.commit_offsets()[(I_TOPIC, 0)] == 2


def test_regenerated_in_turn_and_unknown_ids() -> None:
    j = Joiner(wait_seconds=60, pair_regenerates=True)
    j.add_interaction(interaction("a", 0), ipos(0))
    j.add_interaction(interaction("b", 10, regenerates="a"), ipos(1))
    j.add_interaction(interaction("c", 20, regenerates="b"), ipos(2))
    j.add_interaction(interaction("d", 30, regenerates="nope"), ipos(3))
    j.add_interaction(interaction("e", 40, regenerates="a", user="bob"), ipos(4))
    b = j.add_feedback(feedback("b", 40, thumbs=1), fpos(0))
    assert b is not None and b.replaced is not None and b.replaced_again
    assert j.unpaired == 2  # an unknown id, another user's interaction


def test_a_regenerate_past_the_window_pairs_with_nothing() -> None:
    j = Joiner(wait_seconds=60, pair_regenerates=True)
    j.add_interaction(interaction("a", 1000), ipos(0))
    j.add_interaction(interaction("b", 61_001, regenerates="a"), ipos(1))
    b = j.add_feedback(feedback("b", 61_002, thumbs=1), fpos(0))
    assert b is not None and b.replaced is None and j.unpaired == 1


def test_forget_user_releases_every_hold() -> None:
    j = Joiner(wait_seconds=60, pair_regenerates=True)
    j.add_interaction(interaction("a", 0), ipos(0))
    j.add_interaction(interaction("b", 10, regenerates="a"), ipos(1))
    j.forget_user("alice")
    assert j.commit_offsets()[(I_TOPIC, 0)] == 2


def test_off_by_default_nothing_is_remembered() -> None:
    j = Joiner(wait_seconds=60)
    j.add_interaction(interaction("a", 0), ipos(0))
    a = j.add_feedback(feedback("a", 5, thumbs=1), fpos(0))
    assert a is not None
    j.release(a.positions)
    j.add_interaction(interaction("b", 10, regenerates="a"), ipos(1))
    b = j.add_feedback(feedback("b", 20, thumbs=1), fpos(1))
    assert b is not None and b.replaced is None
    j.release(b.positions)
    assert j.commit_offsets()[(I_TOPIC, 0)] == 2


@pytest.fixture(scope="module")
def tokenizer(model_dir: Path):
    return AutoTokenizer.from_pretrained(str(model_dir))


def maker(tokenizer, mode: str = "both", sources=("regenerate", "edit"), **kw) -> PairMaker:
    cfg = PreferenceConfig(mode, frozenset(sources), **kw)  # type: ignore[arg-type]
    return PairMaker(cfg, tokenizer, context=64)


def sample_b(*fbs: events_pb2.FeedbackEvent, again: bool = False) -> Sample:
    a = interaction("a", 0, response=(7, 8, 9))
    a.prompt_token_ids[:] = [1, 40, 41]
    b = interaction("b", 10, regenerates="a", response=(5, 6))
    pos = (ipos(1),)
    return Sample(b, fbs[0] if fbs else None, pos, tuple(fbs), a, again)


def test_regenerate_pair_is_the_new_response_over_the_replaced_on_its_prompt(tokenizer) -> None:
    (pair,) = maker(tokenizer).pairs(sample_b())
    assert (pair.source, pair.prompt, pair.chosen, pair.rejected) == (
        "regenerate",
        [1, 40, 41],
        [5, 6],
        [7, 8, 9],
    )
    (pair,) = maker(tokenizer).pairs(sample_b(feedback("b", 20, thumbs=1)))
    assert pair.chosen == [5, 6]


@pytest.mark.parametrize(
    "signals",
    [{"thumbs": -1}, {"rating": 0.2}, {"accepted": False}, {"regenerated": True}],
)
def test_regenerate_pair_is_dropped_when_the_new_one_is_turned_down(tokenizer, signals) -> None:
    m = maker(tokenizer)
    assert m.pairs(sample_b(feedback("b", 20, **signals))) == []
    assert m.skipped["turned_down"] == 1
    assert turned_down(common_pb2.FeedbackSignals(**signals))


def test_regenerate_pair_is_dropped_when_regenerated_in_turn(tokenizer) -> None:
    assert maker(tokenizer).pairs(sample_b(again=True)) == []


def test_no_pairs_in_reward_mode_or_without_the_source(tokenizer) -> None:
    edit = feedback("b", 20, edited_text="Fine.")
    assert maker(tokenizer, mode="reward").pairs(sample_b(edit)) == []
    only_edit = maker(tokenizer, sources=("edit",)).pairs(sample_b(edit))
    assert [p.source for p in only_edit] == ["edit"]


def test_edit_is_tokenized_as_a_whole_response(tokenizer) -> None:
    inter = interaction("a", 0)
    inter.response_text = " Certainly. Boil water."
    fb = feedback("a", 5, edited_text="Sure thing! Boil water.")
    m = maker(tokenizer, sources=("edit",))
    (pair,) = m.pairs(Sample(inter, fb, (ipos(0), fpos(0))))
    expected = tokenizer(" Sure thing! Boil water.", add_special_tokens=False)["input_ids"]
    assert pair.chosen == [*expected, tokenizer.eos_token_id]
    assert pair.rejected == [3, 4] and pair.prompt == [1, 2]
    assert (
        m.encode_response(" own space", " x")[:-1]
        == (tokenizer(" own space", add_special_tokens=False)["input_ids"])
    )


def test_edits_that_cannot_pair_are_skipped_by_reason(tokenizer) -> None:
    m = maker(tokenizer, sources=("edit",), max_edit_chars=10)
    inter = interaction("a", 0)
    assert m.pairs(Sample(inter, feedback("a", 5, edited_text="x" * 11), (ipos(0),))) == []
    assert m.pairs(Sample(inter, feedback("a", 5, edited_text="   "), (ipos(0),))) == []
    assert m.skipped == {"too_long": 1, "empty": 1}
    wide = maker(tokenizer, sources=("edit",))
    beyond = feedback("a", 5, edited_text="the end " * 40)  # past the context of 64 tokens
    assert wide.pairs(Sample(inter, beyond, (ipos(0),))) == []
    assert wide.skipped == {"too_long": 1}


def test_a_regenerate_with_the_same_tokens_is_no_pair(tokenizer) -> None:
    m = maker(tokenizer)
    sample = sample_b()
    assert sample.replaced is not None
    sample.replaced.response_token_ids[:] = [5, 6]
    assert m.pairs(sample) == [] and m.skipped == {"identical": 1}
