"""The demo world without a model: corpus, attribute scorer, simulated users, eval maths."""

from __future__ import annotations

import random
import statistics
from pathlib import Path

import numpy as np

from loraloop.demo_world import TASTES, make_users, style_of
from loraloop.devtools.demo_corpus import (
    ATTRIBUTES,
    CONTROL,
    control_line,
    generate_corpus,
    render_reply,
    sample_prompt,
    sample_style,
)
from loraloop.eval import is_well_formed, known_sentences, sign_flip_p, summarize


def test_corpus_is_deterministic_and_varied() -> None:
    a, b = generate_corpus(3, 400), generate_corpus(3, 400)
    assert a == b and a != generate_corpus(4, 400)
    assert sum(d.startswith("system: ") for d in a) / len(a) > 0.8  # control lines
    assert any(not d.startswith("system: ") for d in a)  # and the base mix
    for attr, values in CONTROL.items():  # every value of every attribute is asked for
        for text in values.values():
            assert any(text in d for d in a), (attr, text)


def test_scorer_reads_every_rendered_style() -> None:
    """The scorer, which only sees text, recovers the style the corpus rendered."""
    rng = random.Random(0)
    seen = set()
    for _ in range(3000):
        topic, thing, _q = sample_prompt(rng)
        style = sample_style(rng)
        seen.add(tuple(style.values()))
        assert style_of(render_reply(rng, topic, thing, style)) == style
    assert len(seen) == np.prod([len(v) for v in ATTRIBUTES.values()])


def test_control_lines_ask_for_what_they_say() -> None:
    line = control_line({"tone": "formal", "emoji": "yes"})
    assert line == "Be formal and polite. Use emoji."
    docs = [d for d in generate_corpus(5, 3000) if d.startswith(f"system: {line}\n")]
    assert docs
    for d in docs:
        style = style_of(d.split("assistant: ", 1)[1])
        assert (style["tone"], style["emoji"]) == ("formal", "yes")


def test_well_formedness_check() -> None:
    known = known_sentences()
    assert not is_well_formed("", known)
    rng = random.Random(2)
    for _ in range(200):
        topic, thing, _q = sample_prompt(rng)
        assert is_well_formed(render_reply(rng, topic, thing, sample_style(rng)), known)
    assert not is_well_formed("Great question! Salt the the fish quickly moon.", known)


def test_users_reward_their_taste_and_react_with_noise() -> None:
    users = make_users(len(TASTES) * 2, seed=0)
    assert [u.shared for u in users[: len(TASTES)]] == [s for _, s in TASTES]
    rng = random.Random(3)
    for user in users:
        good = render_reply(rng, "cooking", "soup", sample_style(rng, user.taste))
        assert user.score(good) == 1.0
        opposite = {a: next(x for x in ATTRIBUTES[a] if x != v) for a, v in user.taste.items()}
        bad = render_reply(rng, "cooking", "soup", sample_style(rng, opposite))
        assert user.score(bad) == 0.0
        liked = [user.react(good)[1] for _ in range(200)]
        disliked = [user.react(bad)[1] for _ in range(200)]
        assert statistics.mean(s["accepted"] for s in liked) > 0.85
        assert statistics.mean(s["accepted"] for s in disliked) < 0.15
        assert statistics.mean(s["dwell_ms"] for s in liked) > 5 * statistics.mean(
            s["dwell_ms"] for s in disliked
        )
        assert {"thumbs", "copied", "edited", "regenerated"} & {
            k for s in liked + disliked for k in s
        }
    # the oracle prompt is the control line of the taste
    assert users[3].oracle_prompt == control_line(users[3].taste)


def test_sign_flip_test() -> None:
    rng = np.random.default_rng(0)
    assert sign_flip_p(list(rng.normal(0.3, 1.0, 200))) < 0.01
    assert sign_flip_p(list(rng.normal(0.0, 1.0, 200))) > 0.05
    assert sign_flip_p([0.0] * 10) == 1.0


def test_summarize_on_synthetic_curves() -> None:
    users = make_users(6, seed=0)
    t = np.arange(40)
    learnt = np.minimum(1.0, 0.4 + 0.1 * t)  # reaches 0.8 (80 % of oracle 1.0) at t = 4
    rewards = {
        "base": {u.user_id: [0.4] * 40 for u in users},
        "global": {u.user_id: [0.5] * 40 for u in users},
        "arm": {u.user_id: list(learnt - (0 if u.shared else 0.2)) for u in users},
        "personalized": {u.user_id: list(learnt) for u in users},
        "oracle": {u.user_id: [1.0] * 40 for u in users},
    }
    out = summarize([(users, rewards)])
    assert out["all"]["to_80pct_oracle"][0] == 5  # 0.4 + 0.1 * 4 at the 5th interaction
    assert abs(out["all"]["gain_vs_global"][0] - 1.0) < 1e-9
    assert abs(out["idiosyncratic"]["lora_added"][0] - 0.2) < 1e-9
    assert out["shared"]["lora_added"][0] == 0.0
    assert out["idiosyncratic"]["lora_added_p"] < 0.001


def test_random_tastes_cover_the_attribute_space_and_are_seeded() -> None:
    from loraloop.demo_world import ATTRIBUTE_VALUES

    users = make_users(200, seed=3, tastes="random")
    assert [u.taste for u in users] == [u.taste for u in make_users(200, 3, "random")]
    assert [u.taste for u in users] != [u.taste for u in make_users(200, 4, "random")]
    seen = {(a, v) for u in users for a, v in u.taste.items()}
    assert seen == {(a, v) for a, vs in ATTRIBUTE_VALUES.items() for v in vs}
    assert {len(u.taste) for u in users} == {1, 2, 3}
    assert all(
        u.shared == (u.taste in ({"tone": "friendly"}, {"tone": "formal"}, {"length": "short"}))
        for u in users
    )


def test_threshold_signals_follow_the_other_apps_mapping() -> None:
    import random

    from loraloop.demo_world import threshold_signals

    rng = random.Random(0)
    assert threshold_signals(0.9, rng)["thumbs"] == 1 and threshold_signals(0.9, rng)["accepted"]
    low = threshold_signals(0.2, rng)
    assert low["thumbs"] == -1 and low["regenerated"] and not low["accepted"]
    mid = threshold_signals(0.6, rng)
    assert "thumbs" not in mid and mid["accepted"] and "regenerated" not in mid
    user = make_users(1, 0, "random", "threshold")[0]
    assert user.signals == "threshold" and "copied" not in user.react("Hello there.")[1]
    import pytest

    with pytest.raises(ValueError, match="unknown world"):
        make_users(1, 0, "odd")


def test_per_user_interactions_to_80_percent_of_the_oracle() -> None:
    import numpy as np

    from loraloop.eval import user_to_80

    late = {"personalized": np.array([0.0] * 20 + [1.0] * 60), "oracle": np.ones(80)}
    never = {"personalized": np.full(80, 0.5), "oracle": np.ones(80)}
    assert user_to_80(late) == 28.0  # 8 of the 10 trailing rewards are 1 at interaction 28
    assert user_to_80(never) is None
    people = make_users(2, 0)
    series = ("base", "global", "arm", "personalized", "oracle")
    rewards = {
        name: {
            people[0].user_id: list(
                late["personalized"] if name == "personalized" else late["oracle"]
            ),
            people[1].user_id: list(
                never["personalized"] if name == "personalized" else never["oracle"]
            ),
        }
        for name in series
    }
    summary = summarize([(people, rewards)])  # type: ignore[list-item]
    assert summary["all"]["users_never_at_80pct"] == 1
    assert summary["all"]["median_user_to_80pct"][0] == (28 + 81) / 2  # type: ignore[index]


def test_validity_is_the_share_of_well_formed_replies_per_quarter(tmp_path: Path) -> None:
    import json

    from loraloop.eval import validity

    good, bad = "Stir it gently.", "zzz qqq"
    rows = [("personalized", "u", good if i < 4 else bad) for i in range(8)]
    rows += [("base", "u", good) for _ in range(8)]
    path = tmp_path / "replies.jsonl"
    path.write_text(
        "".join(json.dumps({"series": s, "user": u, "text": t}) + "\n" for s, u, t in rows)
    )
    found = validity(path, 8, known_sentences())
    assert found == {"base": (1.0, 1.0), "personalized": (1.0, 0.0)}
