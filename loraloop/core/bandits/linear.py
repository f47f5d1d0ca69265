"""Bayesian linear reward model per arm, per user, shrunk toward the population.

Sufficient statistics per (user, arm): XtX = sum x x^T, Xtr = sum r x, n. The posterior a
user's choice uses adds the population's statistics (all users pooled) as a prior worth
at most `prior_strength` observations, so a cold user starts from what works for
everyone and moves to their own taste as their data grows:

    A    = L + w * XtX_pop + XtX_user,     w = min(1, prior_strength / n_pop)
    b    = L m e0 + w * Xtr_pop + Xtr_user
    mean = A^-1 b,   covariance = scale^2 * A^-1

L = diag(ridge, slope_ridge, ...) is the prior's precision in observations: weak on the
bias coefficient, whose prior mean is the reference reward m (the population's mean
reward, else the user's, else 0), and strong on the context coefficients, so a context
feature moves an arm's score only once the data show it matters. `scale` is the
reward's standard deviation within an arm, estimated from the rewards seen (see
`reward_scale`), so exploration does not depend on the reward's unit: rewards r and
a r + c (a > 0) give scores a s + c with standard deviations a sd, the same choices.
The first feature of every context must be the constant 1 (features.py).

The spread is kept per state (user or population) as Welford's running sum of squared
deviations of each reward from its arm's mean reward before and after it (`m2`), over
`m2_n` updates (an arm's first reward has no mean to deviate from). State written
before these existed has neither and starts them at 0: the spread prior rules until new
rewards arrive. On the wire they are BanditState.reward_m2 and reward_m2_n.

Every state belongs to one context schema (`schema`, its fingerprint: context_schema.py);
state written before schemas existed belongs to the built-in one. Readers ask for the
schema they use (`from_json`) or check `schema` (`from_proto`): statistics over another
schema's vectors are never mixed with their own.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from loraloop.core.bandits.context_schema import BUILTIN, recorded_schema
from loraloop.core.gen.loraloop.v1 import events_pb2

POPULATION = "*population*"  # key of the pooled statistics (never a valid user id)
RESERVED_ARM_NAMES = frozenset({"_seq", "_dim", "_m2", "_m2_n", "_schema"})  # keys of to_json

PRIOR_STRENGTH = 5.0  # observations the population is worth to a cold user
RIDGE = 1.0  # prior precision of the bias coefficient, in observations
SLOPE_RIDGE = 10.0  # prior precision of each context coefficient, in observations
SCALE_PRIOR = 0.5  # reward standard deviation assumed before any reward is seen
SCALE_PRIOR_WEIGHT = 5.0  # observations that assumption is worth


def population_key(schema: str) -> str:
    """The key of the pooled statistics over context schema `schema` (a fingerprint):
    POPULATION for the built-in schema (as before schemas existed), else
    "*population*@<fingerprint>", so every schema's pool survives a change of schema."""
    schema = recorded_schema(schema)
    return POPULATION if schema == BUILTIN.fingerprint else f"{POPULATION}@{schema}"


@dataclass
class ArmStats:
    dim: int
    xtx: np.ndarray = field(init=False)
    xtr: np.ndarray = field(init=False)
    n: int = 0
    reward_sum: float = 0.0

    def __post_init__(self) -> None:
        self.xtx = np.zeros((self.dim, self.dim))
        self.xtr = np.zeros(self.dim)

    def update(self, x: np.ndarray, reward: float) -> None:
        self.xtx += np.outer(x, x)
        self.xtr += reward * x
        self.n += 1
        self.reward_sum += reward

    @property
    def mean_reward(self) -> float:
        return self.reward_sum / self.n if self.n else 0.0


@dataclass
class Posterior:
    mean: np.ndarray  # [arms, d]
    precision_inv: np.ndarray  # [arms, d, d]
    scale: float = 1.0  # reward standard deviation: covariance = scale^2 * precision_inv


class BanditState:
    """Statistics of every arm for one user (or the population)."""

    def __init__(self, arms: list[str], dim: int, schema: str = "") -> None:
        self.arms = list(arms)
        self.dim = dim
        self.schema = recorded_schema(schema)  # the context schema's fingerprint
        self.stats = {a: ArmStats(dim) for a in arms}
        self.seq = 0
        self.m2 = 0.0  # sum over updates of (r - arm mean before) * (r - arm mean after)
        self.m2_n = 0  # updates m2 covers

    def update(self, arm: str, x: np.ndarray, reward: float) -> None:
        if arm in self.stats and len(x) == self.dim:
            s = self.stats[arm]
            if s.n:
                before, after = s.mean_reward, (s.reward_sum + reward) / (s.n + 1)
                self.m2 += (reward - before) * (reward - after)
                self.m2_n += 1
            s.update(x, reward)
            self.seq += 1

    @property
    def mean_reward(self) -> float | None:
        """Mean reward over every arm's pulls; None without any."""
        n = sum(s.n for s in self.stats.values())
        return sum(s.reward_sum for s in self.stats.values()) / n if n else None

    def to_proto(self, key: str, timestamp_ms: int) -> events_pb2.BanditState:
        arms = [
            events_pb2.ArmStatistics(
                arm=a,
                xtx=s.xtx.ravel().tolist(),
                xtr=s.xtr.tolist(),
                pulls=s.n,
                reward_sum=s.reward_sum,
            )
            for a, s in self.stats.items()
        ]
        return events_pb2.BanditState(
            key=key,
            seq=self.seq,
            dim=self.dim,
            timestamp_ms=timestamp_ms,
            arms=arms,
            reward_m2=self.m2,
            reward_m2_n=self.m2_n,
            context_schema=self.schema,
        )

    def to_json(self) -> dict[str, Any]:
        return {
            a: {
                "xtx": s.xtx.ravel().tolist(),
                "xtr": s.xtr.tolist(),
                "n": s.n,
                "reward_sum": s.reward_sum,
            }
            for a, s in self.stats.items()
        } | {
            "_seq": self.seq,
            "_dim": self.dim,
            "_m2": self.m2,
            "_m2_n": self.m2_n,
            "_schema": self.schema,
        }

    @staticmethod
    def json_schema(data: dict[str, Any] | None) -> str:
        """The context schema (fingerprint) of a to_json dict (older: the built-in one)."""
        return recorded_schema(str((data or {}).get("_schema") or ""))

    @classmethod
    def from_json(
        cls, data: dict[str, Any] | None, arms: list[str], dim: int, schema: str = ""
    ) -> BanditState:
        """Rebuild from to_json's dict, when it is over context schema `schema` with `dim`
        values (else an empty state of that schema: the caller keeps the dict, see
        learner/user_models.py); state without "_m2" (older) starts its spread at 0."""
        state = cls(arms, dim, schema)
        if not data or data.get("_dim") != dim or cls.json_schema(data) != state.schema:
            return state
        state.seq = int(data.get("_seq", 0))
        state.m2, state.m2_n = float(data.get("_m2", 0.0)), int(data.get("_m2_n", 0))
        for a, s in state.stats.items():
            if a in data:
                s.xtx = np.array(data[a]["xtx"]).reshape(dim, dim)
                s.xtr = np.array(data[a]["xtr"])
                s.n, s.reward_sum = int(data[a]["n"]), float(data[a]["reward_sum"])
        return state

    @classmethod
    def from_proto(cls, msg: events_pb2.BanditState, arms: list[str]) -> BanditState:
        """Rebuild from an event; arms the event lacks start empty, unknown ones are dropped,
        and an event without a spread (older) starts it at 0. `schema` is the event's context
        schema: the caller checks it is its own."""
        state = cls(arms, msg.dim, msg.context_schema)
        state.seq = msg.seq
        state.m2, state.m2_n = msg.reward_m2, msg.reward_m2_n
        for a in msg.arms:
            if a.arm in state.stats and len(a.xtr) == msg.dim and len(a.xtx) == msg.dim**2:
                s = state.stats[a.arm]
                s.xtx = np.array(a.xtx).reshape(msg.dim, msg.dim)
                s.xtr = np.array(a.xtr)
                s.n, s.reward_sum = a.pulls, a.reward_sum
        return state


def reward_scale(user: BanditState | None, population: BanditState | None) -> float:
    """The reward's standard deviation within an arm, for a user's choice.

    The population's pooled spread, shrunk toward SCALE_PRIOR (worth SCALE_PRIOR_WEIGHT
    updates), is the prior of the user's own, which is worth the same weight:

        v_pop  = (W * SCALE_PRIOR^2 + m2_pop) / (W + m2_n_pop)
        scale  = sqrt((W * v_pop + m2_user) / (W + m2_n_user))
    """
    w = SCALE_PRIOR_WEIGHT
    var = SCALE_PRIOR**2
    for state in (population, user):
        if state is not None:
            var = (w * var + max(state.m2, 0.0)) / (w + state.m2_n)
    return float(np.sqrt(var))


def posterior(
    user: BanditState | None,
    population: BanditState | None,
    arms: list[str],
    dim: int,
    prior_strength: float = PRIOR_STRENGTH,
    ridge: float = RIDGE,
    slope_ridge: float = SLOPE_RIDGE,
) -> Posterior:
    """The per-arm posterior of a user's reward model, population-shrunk."""
    reference = next(
        (m for m in (s.mean_reward for s in (population, user) if s) if m is not None), 0.0
    )
    prior = np.diag([ridge] + [slope_ridge] * (dim - 1))
    means, covs = [], []
    for arm in arms:
        a_mat = prior.copy()
        b_vec = prior[:, 0] * reference
        pop = population.stats.get(arm) if population else None
        if pop is not None and pop.n:
            w = min(1.0, prior_strength / pop.n)
            a_mat = a_mat + w * pop.xtx
            b_vec = b_vec + w * pop.xtr
        own = user.stats.get(arm) if user else None
        if own is not None and own.n:
            a_mat = a_mat + own.xtx
            b_vec = b_vec + own.xtr
        inv = np.linalg.inv(a_mat)
        means.append(inv @ b_vec)
        covs.append(inv)
    return Posterior(np.array(means), np.array(covs), reward_scale(user, population))
