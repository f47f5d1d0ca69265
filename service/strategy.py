"""Which response strategy (bandit arm) each request gets.

The learner publishes every user's arm statistics, and the pooled population's, on the
compacted `bandit-state` topic; this module follows it and chooses with linear Thompson
sampling or LinUCB over the user's population-shrunk posterior, returning the arm and
its propensity, which the interaction event logs for off-policy learning and evaluation.

A request that sets one of the arms' levers itself (loraloop/core/bandits/arms.py) gets no arm
(`NO_ARM`, propensity 0): nothing of the arms could be applied as defined, so the
interaction must not be credited to any of them.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

import numpy as np

from loraloop.core.bandits import linucb, thompson
from loraloop.core.bandits.arms import NO_ARM, Arm, arm_levers, load_arms
from loraloop.core.bandits.features import DIM
from loraloop.core.bandits.linear import POPULATION, BanditState, posterior
from loraloop.core.gen.loraloop.v1 import events_pb2
from loraloop.core.kafka.follow import TopicFollower
from loraloop.core.settings import Settings
from loraloop.service.validation import invalid


@dataclass(frozen=True)
class Choice:
    arm: Arm  # NO_ARM: none applied (the request set a lever of the arms itself)
    propensity: float
    overrides: tuple[str, ...] = ()  # the arms' levers the request set itself

    @property
    def applied(self) -> bool:
        return self.arm is not NO_ARM


class StrategyChooser:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.arms = load_arms(settings.arms_file)
        self.names = [a.name for a in self.arms]
        self.levers = arm_levers(self.arms)  # what a request must leave to the arm
        self._states: dict[str, BanditState] = {}
        self._lock = threading.Lock()
        self._rng = np.random.default_rng()
        self._follower: TopicFollower | None = None
        if len(self.arms) > 1:
            self._follower = TopicFollower(
                settings.kafka_bootstrap,
                [settings.topic_bandit_state],
                self._apply,
                "bandit-state",
            )

    def start(self) -> None:
        if self._follower:
            self._follower.start()

    def stop(self) -> None:
        if self._follower:
            self._follower.stop()

    def _apply(self, _topic: str, key: bytes | None, value: bytes | None, _ts: int = 0) -> None:
        if key is None:
            return
        name = key.decode(errors="replace")
        if value is None:
            self.forget(name)
            return
        state = BanditState.from_proto(events_pb2.BanditState.FromString(value), self.names)
        if state.dim != DIM:
            return
        with self._lock:
            current = self._states.get(name)
            if current is None or state.seq > current.seq:
                self._states[name] = state

    def forget(self, user_id: str) -> None:
        with self._lock:
            self._states.pop(user_id, None)

    def has_state(self, user_id: str) -> bool:
        """Whether this server holds bandit statistics of the user."""
        with self._lock:
            return user_id in self._states

    def choose(
        self,
        user_id: str,
        x: np.ndarray,
        pinned: str | None = None,
        set_by_request: frozenset[str] = frozenset(),
    ) -> Choice:
        """The arm for this request and its propensity (1 when pinned or only one arm), or
        NO_ARM (propensity 0) when the request sets one of the arms' levers itself
        (`set_by_request`: "system_prompt", "temperature", "top_p")."""
        if pinned is not None and pinned not in self.names:
            raise invalid(f"arm={pinned!r} is unknown: use one of {', '.join(self.names)}")
        overrides = tuple(sorted(set_by_request & self.levers))
        if overrides:
            return Choice(NO_ARM, 0.0, overrides)
        if pinned is not None:
            return Choice(self.arms[self.names.index(pinned)], 1.0)
        if len(self.arms) == 1:
            return Choice(self.arms[0], 1.0)
        s = self.settings
        with self._lock:
            user, population = self._states.get(user_id), self._states.get(POPULATION)
            post = posterior(user, population, self.names, DIM, s.bandit_prior_strength)
            if s.bandit == "linucb":
                index, p = linucb.choose(post, x, self._rng, s.bandit_alpha, s.bandit_epsilon)
            else:
                index, p = thompson.choose(post, x, self._rng, s.bandit_noise)
        return Choice(self.arms[index], p)

    def arm_stats(self, user_id: str) -> list[tuple[str, int, float]]:
        """(arm, pulls, mean reward) of a user, for GetUserState."""
        with self._lock:
            state = self._states.get(user_id)
            if state is None:
                return []
            return [(a, st.n, st.mean_reward) for a, st in state.stats.items()]
