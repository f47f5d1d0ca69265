"""Thompson sampling's arm choice per request: time and propensity accuracy.

Baseline (run in the same process, interleaved): the earlier method, which drew every
arm's whole weight vector through a Cholesky factor, and estimated the propensity from
256 more such draws. Current: one scalar score draw per arm, and the propensity by
quadrature over the chosen arm's score (loraloop/core/bandits/thompson.py).

    python benchmarks/bench_bandit_choice.py [--arms 6] [--dim 3] [--repeats 15]

Prints the median time per choice of each, their ratio, and each method's largest
propensity error against a million-draw Monte Carlo estimate.
"""

from __future__ import annotations

import argparse
import statistics
import timeit

import numpy as np

from loraloop.core.bandits import thompson
from loraloop.core.bandits.linear import Posterior


def baseline_choose(
    post: Posterior, x: np.ndarray, rng: np.random.Generator, noise: float = 0.5, draws: int = 256
) -> tuple[int, float]:
    """The earlier implementation: d-dimensional posterior draws, Monte Carlo propensity."""
    arms, dim = post.mean.shape
    chol = np.linalg.cholesky(post.precision_inv * noise**2 + 1e-12 * np.eye(dim))
    z = rng.standard_normal((draws + 1, arms, dim))
    thetas = post.mean[None] + np.einsum("aij,saj->sai", chol, z)
    winners = (thetas @ x).argmax(axis=1)
    chosen = int(winners[0])
    return chosen, max(float((winners[1:] == chosen).mean()), 1.0 / draws)


def make_posterior(arms: int, dim: int, rng: np.random.Generator) -> Posterior:
    """A posterior after a few dozen observations per arm (scores close enough to compete)."""
    means, covs = [], []
    for _ in range(arms):
        xs = rng.normal(size=(30, dim))
        a = np.eye(dim) + xs.T @ xs
        inv = np.linalg.inv(a)
        means.append(inv @ (xs.T @ rng.normal(0.3, 0.5, size=30)))
        covs.append(inv)
    return Posterior(np.array(means), np.array(covs))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arms", type=int, default=6)
    parser.add_argument("--dim", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--calls", type=int, default=500, help="choices per timed repeat")
    ns = parser.parse_args()
    rng = np.random.default_rng(0)
    post = make_posterior(ns.arms, ns.dim, rng)
    x = np.concatenate([[1.0], rng.uniform(0, 1, ns.dim - 1)])

    base_t, new_t = [], []
    for _ in range(ns.repeats):  # interleaved A/B
        base_t.append(timeit.timeit(lambda: baseline_choose(post, x, rng), number=ns.calls))
        new_t.append(timeit.timeit(lambda: thompson.choose(post, x, rng), number=ns.calls))
    base_us = statistics.median(base_t) / ns.calls * 1e6
    new_us = statistics.median(new_t) / ns.calls * 1e6

    means, sd = thompson.score_distribution(post, x, 0.5)
    draws = 1_000_000
    wins = np.bincount(
        (means + sd * rng.standard_normal((draws, ns.arms))).argmax(1), minlength=ns.arms
    )
    reference = wins / draws
    exact_err = max(
        abs(thompson.win_probability(means, sd, k) - reference[k]) for k in range(ns.arms)
    )
    mc_err = []
    for _ in range(200):  # the baseline's estimate is random: its typical error
        k, p = baseline_choose(post, x, rng)
        mc_err.append(abs(p - reference[k]))
    print(f"Thompson choice, {ns.arms} arms, context dim {ns.dim}, medians of {ns.repeats}:")
    print(f"  baseline (weight draws + 256-draw propensity): {base_us:8.1f} us per choice")
    print(f"  current  (score draws + quadrature):           {new_us:8.1f} us per choice")
    print(f"  -> {base_us / new_us:.1f}x faster")
    noise = max((p * (1 - p) / draws) ** 0.5 for p in reference)
    print(
        f"  propensity vs {draws:,} Thompson draws (whose own standard error is up to "
        f"{noise:.0e}): current max difference {exact_err:.1e}, baseline median "
        f"{statistics.median(mc_err):.1e} (max {max(mc_err):.1e}); the quadrature's own "
        "error against an exact integral is tested in tests/unit/test_bandits.py"
    )


if __name__ == "__main__":
    main()
