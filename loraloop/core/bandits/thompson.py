"""Linear Thompson sampling: draw each arm's weights from its posterior, play the best.

Only each arm's *score* theta_a . x matters for the choice, and under the Gaussian
posterior theta_a ~ N(mu_a, (noise * scale)^2 A_a^-1) it is itself Gaussian and
independent of the other arms' scores:

    s_a ~ N(m_a, sd_a^2),    m_a = mu_a . x,    sd_a^2 = (noise * scale)^2 x^T A_a^-1 x

So one scalar draw per arm is the same choice as a draw of every arm's weight vector,
without a Cholesky factor or d-dimensional draws.

`scale` is the reward's standard deviation estimated from the rewards seen
(linear.reward_scale), so `noise` is unit-free: 1 is the Bayesian posterior, smaller is
greedier (0.5, the default, did best of 0.3 to 1 on the world of
benchmarks/bench_bandit_world.py).

The propensity of the chosen arm k (for off-policy evaluation and importance weights) is

    P(k) = integral over t of  pdf_k(t) * prod_{a != k} Phi((t - m_a) / sd_a)  dt,

a one-dimensional integral, computed here by the midpoint rule on `QUANTILES` equal-mass
strata of s_k (t_i = m_k + sd_k z_i, z_i the normal quantile of (i + 1/2) / n). That is
deterministic, costs n x arms evaluations of Phi, and its error is O(1/n^2) for smooth
integrands and below 1/n per arm whose score is much sharper than s_k (a step in t);
tests/unit/test_bandits.py checks it against a million-draw Monte Carlo estimate.
"""

from __future__ import annotations

from statistics import NormalDist

import numpy as np

from loraloop.core.bandits.linear import Posterior

QUANTILES = 512
_Z = np.array([NormalDist().inv_cdf((i + 0.5) / QUANTILES) for i in range(QUANTILES)])
_MIN_PROPENSITY = 1e-6  # logged propensities are divided by; never 0 for a chosen arm


def score_distribution(
    post: Posterior, x: np.ndarray, noise: float
) -> tuple[np.ndarray, np.ndarray]:
    """Mean and standard deviation of every arm's score at context `x`."""
    means = post.mean @ x
    var = (noise * post.scale) ** 2 * np.einsum("i,aij,j->a", x, post.precision_inv, x)
    return means, np.sqrt(np.maximum(var, 0.0))


def _phi(z: np.ndarray) -> np.ndarray:
    """Standard normal CDF, vectorised (erf by Abramowitz & Stegun 7.1.26, |error| below
    1.5e-7: far below the propensity's quadrature error)."""
    u = np.abs(z) / np.sqrt(2.0)
    t = 1.0 / (1.0 + 0.3275911 * u)
    poly = t * (
        0.254829592 + t * (-0.284496736 + t * (1.421413741 + t * (-1.453152027 + t * 1.061405429)))
    )
    erf = 1.0 - poly * np.exp(-u * u)
    return 0.5 * (1.0 + np.sign(z) * erf)


def win_probability(means: np.ndarray, sd: np.ndarray, k: int) -> float:
    """P(arm k's score is the highest), the scores independent N(means, sd^2). An arm
    with sd 0 is a step at its mean (z clipped to +-40, where Phi is 0 or 1 in float64)."""
    t = means[k] + sd[k] * _Z  # [QUANTILES]
    others = np.arange(len(means)) != k
    z = np.clip((t[None] - means[others, None]) / np.maximum(sd[others, None], 1e-300), -40, 40)
    return float(np.prod(_phi(z), axis=0).mean())


def choose(
    post: Posterior,
    x: np.ndarray,
    rng: np.random.Generator,
    noise: float = 0.5,
) -> tuple[int, float]:
    """(chosen arm index, its probability under Thompson sampling)."""
    means, sd = score_distribution(post, x, noise)
    chosen = int(np.argmax(means + sd * rng.standard_normal(len(means))))
    return chosen, max(win_probability(means, sd, chosen), _MIN_PROPENSITY)
