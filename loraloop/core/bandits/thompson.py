"""Linear Thompson sampling: draw each arm's weights from its posterior, play the best.

The propensity of the chosen arm (needed for off-policy evaluation and importance
weighting) has no closed form; it is estimated from `draws` further posterior samples.
"""

from __future__ import annotations

import numpy as np

from loraloop.core.bandits.linear import Posterior


def choose(
    post: Posterior,
    x: np.ndarray,
    rng: np.random.Generator,
    noise: float = 0.5,
    draws: int = 256,
) -> tuple[int, float]:
    """(chosen arm index, its probability under Thompson sampling)."""
    arms, dim = post.mean.shape
    chol = np.linalg.cholesky(post.precision_inv * noise**2 + 1e-12 * np.eye(dim))
    z = rng.standard_normal((draws + 1, arms, dim))
    thetas = post.mean[None] + np.einsum("aij,saj->sai", chol, z)
    scores = thetas @ x  # [draws + 1, arms]
    winners = scores.argmax(axis=1)
    chosen = int(winners[0])
    propensity = float((winners[1:] == chosen).mean())
    return chosen, max(propensity, 1.0 / draws)
