"""reward(): the weighted sum of feedback signals, clipped to [-1, 1], by hand."""

from __future__ import annotations

import pydantic
import pytest

from loraloop.core.gen.loraloop.v1 import common_pb2
from loraloop.core.settings import Settings
from loraloop.learner.rewards import RewardConfig, reward, reward_config


def sig(**kw) -> common_pb2.FeedbackSignals:
    return common_pb2.FeedbackSignals(**kw)


@pytest.mark.parametrize(
    ("signals", "expected"),
    [
        # single signals, default weights
        (dict(thumbs=1), 1.0),
        (dict(thumbs=-1), -1.0),
        (dict(rating=0.75), 0.5),  # 1.0 * (2*0.75 - 1)
        (dict(rating=0.25), -0.5),
        (dict(rating=0.5), 0.0),
        (dict(rating=0.0), -1.0),
        (dict(accepted=True), 0.5),
        (dict(accepted=False), -0.5),  # an explicit "not accepted" costs
        (dict(copied=True), 0.3),
        (dict(copied=False), 0.0),  # not copying is no signal
        (dict(regenerated=True), -0.5),
        (dict(regenerated=False), 0.0),
        (dict(edited=True), -0.1),
        (dict(follow_up=True), 0.1),
        (dict(dwell_ms=15_000), 0.1),  # 0.2 * 15000/30000
        (dict(dwell_ms=3_000), 0.02),
        (dict(dwell_ms=60_000), 0.2),  # saturates at dwell_full_ms
        (dict(dwell_ms=0), 0.0),
        (dict(dwell_ms=-5_000), 0.0),  # negative dwell never subtracts
        # combinations
        (dict(accepted=True, copied=True, dwell_ms=15_000), 0.9),
        (dict(regenerated=True, edited=True, dwell_ms=3_000), -0.58),
        (dict(rating=0.75, follow_up=True, copied=True), 0.9),
        (dict(thumbs=-1, copied=True, follow_up=True), -0.6),
        (dict(accepted=False, edited=True, follow_up=True), -0.5),
        # clipped to [-1, 1]
        (dict(thumbs=1, accepted=True, copied=True), 1.0),  # 1.8
        (dict(thumbs=1, rating=1.0), 1.0),  # 2.0
        (dict(thumbs=-1, regenerated=True, accepted=False), -1.0),  # -2.0
        (dict(thumbs=-1, rating=0.0, edited=True), -1.0),  # -2.1
        (dict(thumbs=1, regenerated=True), 0.5),  # inside the range: not clipped
        # empty: no signal, no reward
        (dict(), 0.0),
    ],
)
def test_default_weights(signals: dict, expected: float) -> None:
    assert reward(sig(**signals)) == pytest.approx(expected, abs=1e-6)


def test_result_always_in_range() -> None:
    for thumbs in (-1, 1, None):
        for acc in (True, False, None):
            for flag in (True, False):
                kw = dict(
                    copied=flag,
                    regenerated=not flag,
                    edited=flag,
                    follow_up=flag,
                    dwell_ms=100_000,
                    rating=1.0 if flag else 0.0,
                )
                if thumbs is not None:
                    kw["thumbs"] = thumbs
                if acc is not None:
                    kw["accepted"] = acc
                assert -1.0 <= reward(sig(**kw)) <= 1.0


def test_custom_weights() -> None:
    cfg = RewardConfig(thumbs=0.2, copied=0.7, dwell=1.0, dwell_full_ms=1000, accepted=0.0)
    assert reward(sig(thumbs=1, copied=True), cfg) == pytest.approx(0.9)
    assert reward(sig(thumbs=-1, copied=True), cfg) == pytest.approx(0.5)
    assert reward(sig(dwell_ms=250), cfg) == pytest.approx(0.25)
    assert reward(sig(dwell_ms=250, copied=True), cfg) == pytest.approx(0.95)
    assert reward(sig(accepted=False), cfg) == 0.0
    assert reward(sig(dwell_ms=5000, thumbs=1), cfg) == pytest.approx(1.0)  # 1.2 -> clipped


def test_out_of_range_thumbs_count_as_unit() -> None:
    # validation refuses such values, but the reward never trusts them either
    cfg = RewardConfig(thumbs=0.4)
    assert reward(sig(thumbs=5), cfg) == pytest.approx(0.4)
    assert reward(sig(thumbs=-7), cfg) == pytest.approx(-0.4)
    assert reward(sig(thumbs=0), cfg) == 0.0


def test_none_config_means_defaults() -> None:
    s = sig(rating=0.9, edited=True)
    assert reward(s, None) == reward(s, RewardConfig()) == pytest.approx(0.7, abs=1e-6)


def test_dwell_full_ms_must_be_positive() -> None:
    with pytest.raises(pydantic.ValidationError):
        RewardConfig(dwell_full_ms=0)


def test_weights_come_from_settings_and_unknown_ones_are_refused() -> None:
    settings = Settings(reward_weights={"thumbs": 0.25, "copied": 0.0})
    cfg = reward_config(settings.reward_weights)
    assert (cfg.thumbs, cfg.copied, cfg.accepted) == (0.25, 0.0, 0.5)
    assert reward(common_pb2.FeedbackSignals(thumbs=1, copied=True), cfg) == 0.25
    with pytest.raises(ValueError, match="known weights"):
        reward_config({"thumbz": 1.0})
