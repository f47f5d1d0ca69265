"""Bayesian linear reward model per arm, per user, shrunk toward the population.

Sufficient statistics per (user, arm): XtX = sum x x^T, Xtr = sum r x, n. The posterior a
user's choice uses adds the population's statistics (all users pooled) as a prior worth
at most `prior_strength` observations, so a cold user starts from what works for
everyone and moves to their own taste as their data grows:

    A    = lambda * I + w * XtX_pop + XtX_user,     w = min(1, prior_strength / n_pop)
    b    = w * Xtr_pop + Xtr_user
    mean = A^-1 b,   covariance = noise^2 * A^-1
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from loraloop.core.gen.loraloop.v1 import events_pb2

POPULATION = "*population*"  # key of the pooled statistics (never a valid user id)


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


class BanditState:
    """Statistics of every arm for one user (or the population)."""

    def __init__(self, arms: list[str], dim: int) -> None:
        self.arms = list(arms)
        self.dim = dim
        self.stats = {a: ArmStats(dim) for a in arms}
        self.seq = 0

    def update(self, arm: str, x: np.ndarray, reward: float) -> None:
        if arm in self.stats and len(x) == self.dim:
            self.stats[arm].update(x, reward)
            self.seq += 1

    def to_proto(self, key: str, timestamp_ms: int) -> events_pb2.BanditState:
        return events_pb2.BanditState(
            key=key,
            seq=self.seq,
            dim=self.dim,
            timestamp_ms=timestamp_ms,
            arms=[
                events_pb2.ArmStatistics(
                    arm=a,
                    xtx=s.xtx.ravel().tolist(),
                    xtr=s.xtr.tolist(),
                    pulls=s.n,
                    reward_sum=s.reward_sum,
                )
                for a, s in self.stats.items()
            ],
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
        } | {"_seq": self.seq, "_dim": self.dim}

    @classmethod
    def from_json(cls, data: dict[str, Any] | None, arms: list[str], dim: int) -> BanditState:
        state = cls(arms, dim)
        if not data or data.get("_dim") != dim:
            return state
        state.seq = int(data.get("_seq", 0))
        for a, s in state.stats.items():
            if a in data:
                s.xtx = np.array(data[a]["xtx"]).reshape(dim, dim)
                s.xtr = np.array(data[a]["xtr"])
                s.n, s.reward_sum = int(data[a]["n"]), float(data[a]["reward_sum"])
        return state

    @classmethod
    def from_proto(cls, msg: events_pb2.BanditState, arms: list[str]) -> BanditState:
        """Rebuild from an event; arms the event lacks start empty, unknown ones are dropped."""
        state = cls(arms, msg.dim)
        state.seq = msg.seq
        for a in msg.arms:
            if a.arm in state.stats and len(a.xtr) == msg.dim and len(a.xtx) == msg.dim**2:
                s = state.stats[a.arm]
                s.xtx = np.array(a.xtx).reshape(msg.dim, msg.dim)
                s.xtr = np.array(a.xtr)
                s.n, s.reward_sum = a.pulls, a.reward_sum
        return state


def posterior(
    user: BanditState | None,
    population: BanditState | None,
    arms: list[str],
    dim: int,
    prior_strength: float = 5.0,
    ridge: float = 1.0,
) -> Posterior:
    """The per-arm posterior of a user's reward model, population-shrunk."""
    means, covs = [], []
    for arm in arms:
        a_mat = ridge * np.eye(dim)
        b_vec = np.zeros(dim)
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
    return Posterior(np.array(means), np.array(covs))
