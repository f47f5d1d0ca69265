"""LinUCB with epsilon exploration: play the highest upper confidence bound, except
with probability epsilon a uniformly random arm, so every arm keeps a known, nonzero
propensity for off-policy evaluation.

The bound is mean + alpha * scale * sqrt(x^T A^-1 x), `scale` the reward's standard
deviation estimated from the rewards seen (linear.reward_scale): `alpha` is unit-free."""

from __future__ import annotations

import numpy as np

from loraloop.core.bandits.linear import Posterior


def scores(post: Posterior, x: np.ndarray, alpha: float = 0.5) -> np.ndarray:
    """Every arm's upper confidence bound at context `x`."""
    width = np.sqrt(np.einsum("i,aij,j->a", x, post.precision_inv, x))
    return np.asarray(post.mean @ x + alpha * post.scale * width)


def choose(
    post: Posterior,
    x: np.ndarray,
    rng: np.random.Generator,
    alpha: float = 0.5,
    epsilon: float = 0.05,
) -> tuple[int, float]:
    """(chosen arm index, its probability under this policy)."""
    arms = post.mean.shape[0]
    best = int(scores(post, x, alpha).argmax())
    chosen = int(rng.integers(arms)) if rng.random() < epsilon else best
    propensity = epsilon / arms + (1 - epsilon if chosen == best else 0.0)
    return chosen, propensity
