"""Off-policy evaluation: what would a candidate arm policy have earned, judged only from
what the deployed policy logged (context x, arm a, propensity p, reward r)?

    IPS   V = 1/n sum_i w_i r_i                          w_i = pi(a_i | x_i) / p_i
    SNIPS V = sum_i w_i r_i / sum_i w_i                   (self-normalised: less variance)
    DR    V = 1/n sum_i [ sum_a pi(a | x_i) q(x_i, a) + w_i (r_i - q(x_i, a_i)) ]

q is, by default, a ridge regression of reward on context per arm fitted to the same logs
(the direct method's model); an operator comparing against another system can pass their
own q-hat instead: a callable from contexts [n, d] to predicted rewards [n, arms], or the
[n, arms] array itself. DR is unbiased if either q or the logged propensities are right.
Each estimate comes with a standard error (sample standard deviation of the per-row terms
over sqrt(n)).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

# A policy maps contexts [n, d] to action probabilities [n, arms].
Policy = Callable[[np.ndarray], np.ndarray]
# A reward model maps contexts [n, d] to predicted rewards [n, arms] (or is that array).
RewardModel = Callable[[np.ndarray], np.ndarray] | np.ndarray


@dataclass(frozen=True)
class Logs:
    contexts: np.ndarray  # [n, d]
    actions: np.ndarray  # [n] arm indices
    propensities: np.ndarray  # [n] probability the logging policy gave the logged arm
    rewards: np.ndarray  # [n]

    def __post_init__(self) -> None:
        n = len(self.actions)
        if not (len(self.contexts) == len(self.propensities) == len(self.rewards) == n):
            raise ValueError("contexts, actions, propensities and rewards differ in length")
        if n and (self.propensities <= 0).any():
            raise ValueError("every logged propensity must be > 0 to reweight it")


@dataclass(frozen=True)
class Estimate:
    value: float
    stderr: float

    def __str__(self) -> str:
        return f"{self.value:.3f} ± {1.96 * self.stderr:.3f}"


def _estimate(terms: np.ndarray) -> Estimate:
    n = len(terms)
    if n == 0:
        return Estimate(math.nan, math.nan)
    stderr = float(terms.std(ddof=1) / math.sqrt(n)) if n > 1 else math.nan
    return Estimate(float(terms.mean()), stderr)


def _weights(logs: Logs, policy: Policy) -> np.ndarray:
    probs = policy(logs.contexts)
    return probs[np.arange(len(logs.actions)), logs.actions] / logs.propensities


def ips(logs: Logs, policy: Policy) -> Estimate:
    return _estimate(_weights(logs, policy) * logs.rewards)


def snips(logs: Logs, policy: Policy) -> Estimate:
    w = _weights(logs, policy)
    total = w.sum()
    if total <= 0:
        return Estimate(math.nan, math.nan)
    value = float((w * logs.rewards).sum() / total)
    # delta-method standard error of a ratio estimator
    terms = w * (logs.rewards - value) / w.mean()
    return Estimate(value, _estimate(terms).stderr)


def fit_reward_model(logs: Logs, arms: int, ridge: float = 1.0) -> np.ndarray:
    """Per-arm ridge regression weights [arms, d] of reward on context."""
    d = logs.contexts.shape[1]
    theta = np.zeros((arms, d))
    for a in range(arms):
        rows = logs.actions == a
        x, r = logs.contexts[rows], logs.rewards[rows]
        theta[a] = np.linalg.solve(x.T @ x + ridge * np.eye(d), x.T @ r)
    return theta


def reward_predictions(logs: Logs, arms: int, q_hat: RewardModel | None = None) -> np.ndarray:
    """q(x_i, a) for every logged row and arm [n, arms]: `q_hat`'s, or the per-arm ridge
    fit's when none is given. A given q-hat of the wrong shape is refused."""
    if q_hat is None:
        return logs.contexts @ fit_reward_model(logs, arms).T
    q = np.asarray(q_hat(logs.contexts) if callable(q_hat) else q_hat, dtype=float)
    if q.shape != (len(logs.actions), arms):
        raise ValueError(
            f"q_hat gave shape {q.shape}: it must predict every logged row's reward for "
            f"every arm, shape ({len(logs.actions)}, {arms})"
        )
    return q


def doubly_robust(
    logs: Logs, policy: Policy, arms: int, q_hat: RewardModel | None = None
) -> Estimate:
    q = reward_predictions(logs, arms, q_hat)  # [n, arms]
    probs = policy(logs.contexts)
    logged_q = q[np.arange(len(logs.actions)), logs.actions]
    terms = (probs * q).sum(axis=1) + _weights(logs, policy) * (logs.rewards - logged_q)
    return _estimate(terms)


def fixed_arm(arm: int, arms: int) -> Policy:
    def policy(x: np.ndarray) -> np.ndarray:
        out = np.zeros((len(x), arms))
        out[:, arm] = 1.0
        return out

    return policy


def uniform(arms: int) -> Policy:
    return lambda x: np.full((len(x), arms), 1.0 / arms)


def greedy(theta: np.ndarray) -> Policy:
    """Play the arm with the highest predicted reward under a fitted linear model."""

    def policy(x: np.ndarray) -> np.ndarray:
        best = (x @ theta.T).argmax(axis=1)
        out = np.zeros((len(x), theta.shape[0]))
        out[np.arange(len(x)), best] = 1.0
        return out

    return policy


def evaluate(
    logs: Logs, policies: dict[str, Policy], arms: int, q_hat: RewardModel | None = None
) -> dict[str, dict[str, Estimate]]:
    """Every estimator for every candidate policy (DR with `q_hat` when given)."""
    q = reward_predictions(logs, arms, q_hat)
    return {
        name: {
            "ips": ips(logs, pol),
            "snips": snips(logs, pol),
            "dr": doubly_robust(logs, pol, arms, q),
        }
        for name, pol in policies.items()
    }
