"""The rollback guard fires exactly when its rules say so."""

from __future__ import annotations

from loraloop.learner.guard import GuardConfig, GuardState, check, record

CFG = GuardConfig(kl_limit=1.0, window=4, drop=0.5)


def test_kl_over_the_limit_fires() -> None:
    state = GuardState()
    assert check(state, 0.99, CFG) is None
    assert check(state, 1.01, CFG) == "kl"


def test_reward_rule_needs_a_full_window_and_a_real_drop() -> None:
    state = GuardState()
    record(state, [1.0, 1.0, 1.0], version=3, cfg=CFG)
    assert state.best_mean is None  # window not full yet
    record(state, [1.0], version=4, cfg=CFG)
    assert (state.best_mean, state.best_version) == (1.0, 4)
    record(state, [0.8, 0.8], version=5, cfg=CFG)  # mean 0.9: a dip, not a fall
    assert check(state, 0.0, CFG) is None
    record(state, [0.0, 0.0], version=6, cfg=CFG)  # window [0.8, 0.8, 0, 0]: mean 0.4
    assert check(state, 0.0, CFG) == "reward"
    assert state.best_version == 4


def test_best_version_moves_up_with_better_windows_only() -> None:
    state = GuardState()
    record(state, [0.5] * 4, version=1, cfg=CFG)
    record(state, [0.2] * 4, version=2, cfg=CFG)
    assert (state.best_mean, state.best_version) == (0.5, 1)
    record(state, [0.9] * 4, version=3, cfg=CFG)
    assert (state.best_mean, state.best_version) == (0.9, 3)


def test_state_round_trips() -> None:
    state = GuardState([0.1, 0.2], 0.7, 5)
    assert GuardState.from_json(state.to_json()) == state
    assert GuardState.from_json(None) == GuardState()
