"""Which response strategy (bandit arm) each request gets.

The learner publishes every user's arm statistics, and the pooled population's, on the
compacted `bandit-state` topic; this module follows it and chooses with linear Thompson
sampling or LinUCB over the user's population-shrunk posterior, returning the arm and
its propensity, which the interaction event logs for off-policy learning and evaluation.

A request that sets one of the arms' levers itself (loraloop/core/bandits/arms.py) gets no arm
(`NO_ARM`, propensity 0): nothing of the arms could be applied as defined, so the
interaction must not be credited to any of them.

The context vector is laid out by the context schema (setting context_schema_file,
loraloop/core/bandits/context_schema.py): only statistics over that same schema are used;
states of another schema (written by a learner with another schema file, or before the
file changed) are ignored and counted (`ignored_states`), never mixed in.
"""

from __future__ import annotations

import logging
import threading
from collections import Counter, OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from loraloop.core.bandits import linucb, thompson
from loraloop.core.bandits.arms import NO_ARM, Arm, arm_levers, load_arms
from loraloop.core.bandits.context_schema import load_context_schema
from loraloop.core.bandits.linear import BanditState, Posterior, population_key, posterior
from loraloop.core.gen.loraloop.v1 import events_pb2
from loraloop.core.kafka.follow import TopicFollower
from loraloop.core.settings import Settings
from loraloop.service.validation import invalid

log = logging.getLogger(__name__)
POSTERIORS_CACHED = 10_000  # users whose posterior is kept between their requests


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
        self.schema = load_context_schema(settings.context_schema_file)
        self._population = population_key(self.schema.fingerprint)
        self.ignored_states = 0  # bandit-state records of another context schema
        self.unknown_values: Counter[str] = Counter()  # per categorical feature
        self._states: dict[str, BanditState] = {}
        # user -> (its state, the population's, their posterior): states are replaced,
        # never changed in place, so the same two objects mean the same posterior
        self._posteriors: OrderedDict[
            str, tuple[BanditState | None, BanditState | None, Posterior]
        ] = OrderedDict()
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
        if state.schema != self.schema.fingerprint or state.dim != self.schema.dim:
            with self._lock:
                self.ignored_states += 1
                first = self.ignored_states == 1
            if first:
                log.warning(
                    "bandit state of %s is over context schema %s (%d values), this server "
                    "uses %s, %s (%d values): ignored (and so are the next ones, counted in "
                    "loraloop_server_bandit_states_ignored_total); give the learner the "
                    "same context_schema_file",
                    name[:200],
                    state.schema[:80],
                    state.dim,
                    self.schema.fingerprint,
                    self.schema.describe(),
                    self.schema.dim,
                )
            return
        with self._lock:
            current = self._states.get(name)
            if current is None or state.seq > current.seq:
                self._states[name] = state

    def forget(self, user_id: str) -> None:
        with self._lock:
            self._states.pop(user_id, None)
            self._posteriors.pop(user_id, None)

    def _posterior(self, user_id: str) -> Posterior:
        """The user's posterior (call with the lock held): computed again only when the
        user's or the population's statistics changed since the last request."""
        user, population = self._states.get(user_id), self._states.get(self._population)
        cached = self._posteriors.get(user_id)
        if cached is not None and cached[0] is user and cached[1] is population:
            self._posteriors.move_to_end(user_id)
            return cached[2]
        post = posterior(
            user, population, self.names, self.schema.dim, self.settings.bandit_prior_strength
        )
        self._posteriors[user_id] = (user, population, post)
        while len(self._posteriors) > POSTERIORS_CACHED:
            self._posteriors.popitem(last=False)
        return post

    def features(
        self,
        prompt_tokens: int,
        conversation: bool,
        numeric: Mapping[str, float] | None = None,
        categorical: Mapping[str, str] | None = None,
    ) -> np.ndarray:
        """The request's context vector under this server's schema (features checked by
        validation.check_context); categorical values the schema does not list are
        counted per feature."""
        x, unknown = self.schema.vector(prompt_tokens, conversation, numeric, categorical)
        if unknown:
            with self._lock:
                self.unknown_values.update(unknown)
        return x

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
            post = self._posterior(user_id)
            if s.bandit == "linucb":
                index, p = linucb.choose(post, x, self._rng, s.bandit_alpha, s.bandit_epsilon)
            else:
                index, p = thompson.choose(post, x, self._rng, s.bandit_noise)
        return Choice(self.arms[index], p)

    def choice_probabilities(self, user_id: str, x: np.ndarray) -> dict[str, float]:
        """The probability of each arm being chosen for the user at context `x` (what
        `choose` draws from when nothing is pinned or overridden)."""
        s = self.settings
        with self._lock:
            post = self._posterior(user_id)
        if len(self.arms) == 1:
            return {self.names[0]: 1.0}
        if s.bandit == "linucb":
            best = int(linucb.scores(post, x, s.bandit_alpha).argmax())
            share = s.bandit_epsilon / len(self.arms)
            return {
                a: share + (1 - s.bandit_epsilon) * (i == best) for i, a in enumerate(self.names)
            }
        means, sd = thompson.score_distribution(post, x, s.bandit_noise)
        return {a: thompson.win_probability(means, sd, i) for i, a in enumerate(self.names)}

    def arm_stats(self, user_id: str) -> list[tuple[str, int, float]]:
        """(arm, pulls, mean reward) of a user, for GetUserState."""
        with self._lock:
            state = self._states.get(user_id)
            if state is None:
                return []
            return [(a, st.n, st.mean_reward) for a, st in state.stats.items()]
