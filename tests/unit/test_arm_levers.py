"""An arm is applied whole or not at all: a request that sets one of the arms' levers
itself gets no arm (propensity 0), so no arm is credited with what it did not do."""

from __future__ import annotations

from pathlib import Path

import grpc
import numpy as np
import pytest

from loraloop.configs import DEMO_ARMS
from loraloop.core.bandits.arms import NO_ARM, Arm, arm_levers, load_arms
from loraloop.core.settings import Settings
from loraloop.service.strategy import StrategyChooser
from loraloop.service.validation import RequestError

X = np.array([1.0, 0.1, 0.0])


def chooser(arms_file: Path) -> StrategyChooser:
    return StrategyChooser(Settings(arms_file=arms_file))  # never started: no Kafka needed


def test_levers_are_what_some_arm_sets() -> None:
    assert arm_levers(load_arms(DEMO_ARMS)) == {"system_prompt"}
    assert arm_levers((Arm("default"),)) == frozenset()
    assert Arm("hot", temperature=1.2, top_p=0.9).levers() == {"temperature", "top_p"}


def test_a_request_with_its_own_system_message_gets_no_demo_arm() -> None:
    strategy = chooser(DEMO_ARMS)
    for pinned in (None, "friendly", "default"):
        choice = strategy.choose("u", X, pinned, frozenset({"system_prompt"}))
        assert choice.arm is NO_ARM and not choice.applied
        assert choice.propensity == 0.0 and choice.overrides == ("system_prompt",)
    # sampling settings no demo arm uses leave the choice to the bandit
    choice = strategy.choose("u", X, None, frozenset({"temperature", "top_p"}))
    assert choice.applied and choice.arm.name in strategy.names and choice.overrides == ()
    pinned = strategy.choose("u", X, "brief", frozenset({"temperature"}))
    assert pinned.arm.name == "brief" and pinned.propensity == 1.0
    with pytest.raises(RequestError) as err:  # an unknown arm is refused whatever else
        strategy.choose("u", X, "nope", frozenset({"system_prompt"}))
    assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT


def test_a_request_setting_the_temperature_an_arm_sets_gets_no_arm(tmp_path: Path) -> None:
    arms = tmp_path / "arms.toml"
    arms.write_text('[[arm]]\nname = "default"\n\n[[arm]]\nname = "hot"\ntemperature = 1.3\n')
    strategy = chooser(arms)
    choice = strategy.choose("u", X, None, frozenset({"temperature", "system_prompt"}))
    assert choice.arm is NO_ARM and choice.overrides == ("temperature",)
    assert strategy.choose("u", X, None, frozenset({"system_prompt"})).applied


def test_the_cached_posterior_follows_every_new_state(tmp_path: Path) -> None:
    """The chooser keeps each user's posterior between requests and computes it again
    when the user's or the population's statistics are replaced, or the user deleted."""
    from loraloop.core.bandits.features import DIM, context_features
    from loraloop.core.bandits.linear import BanditState

    arms = tmp_path / "arms.toml"
    arms.write_text('[[arm]]\nname = "a"\n[[arm]]\nname = "b"\n')
    c = chooser(arms)
    x = context_features(10, False)
    before = c.choice_probabilities("u", x)
    assert c.choice_probabilities("u", x) == before  # the same posterior: same figures
    post = c._posteriors["u"][2]
    state = BanditState(["a", "b"], DIM)
    for _ in range(30):
        state.update("a", x, 1.0)
        state.update("b", x, 0.0)
    c._apply("bandit-state", b"u", state.to_proto("u", 1).SerializeToString())
    after = c.choice_probabilities("u", x)
    assert after["a"] > 0.9 > before["a"] and c._posteriors["u"][2] is not post
    population = BanditState(["a", "b"], DIM)
    population.update("b", x, 1.0)
    cached = c._posteriors["u"][2]
    record = population.to_proto("*population*", 1).SerializeToString()
    c._apply("bandit-state", b"*population*", record)
    with c._lock:
        assert c._posterior("u") is not cached  # a new population: computed again
        assert c._posteriors["u"][1] is c._states["*population*"]
    c.forget("u")
    assert "u" not in c._posteriors
