"""Bandit math: posterior shrinkage toward the population, propensities, arms files."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from loraloop.core.bandits import linucb, thompson
from loraloop.core.bandits.arms import DEFAULT_ARMS, load_arms
from loraloop.core.bandits.features import DIM, context_features
from loraloop.core.bandits.linear import POPULATION, BanditState, posterior
from loraloop.core.user_ids import user_id_error

ARMS = ["a", "b", "c"]


def test_population_key_can_never_be_a_user_id() -> None:
    assert user_id_error(POPULATION) is not None


def test_posterior_is_ridge_regression_by_hand() -> None:
    user = BanditState(ARMS, 2)
    x = np.array([1.0, 0.5])
    for r in (1.0, 0.0, 1.0):
        user.update("a", x, r)
    post = posterior(user, None, ARMS, 2, ridge=1.0)
    a_mat = np.eye(2) + 3 * np.outer(x, x)
    expected = np.linalg.solve(a_mat, 2.0 * x)
    np.testing.assert_allclose(post.mean[0], expected)
    np.testing.assert_allclose(post.precision_inv[0], np.linalg.inv(a_mat))
    np.testing.assert_allclose(post.mean[1], 0.0)  # no data: the prior mean


def test_cold_user_borrows_from_the_population_then_follows_own_data() -> None:
    x = np.array([1.0, 0.0, 0.0])
    pop = BanditState(ARMS, 3)
    for _ in range(500):
        pop.update("a", x, 1.0)
        pop.update("b", x, -1.0)
    cold = posterior(None, pop, ARMS, 3, prior_strength=5.0)
    assert cold.mean[0] @ x > 0.5 > -0.5 > cold.mean[1] @ x  # population's taste
    # worth at most 5 observations: 5 * 1 / (1 + 5)
    assert cold.mean[0] @ x == pytest.approx(5 / 6)
    own = BanditState(ARMS, 3)
    for _ in range(50):
        own.update("a", x, -1.0)
        own.update("b", x, 1.0)
    warm = posterior(own, pop, ARMS, 3, prior_strength=5.0)
    assert warm.mean[1] @ x > 0.7 and warm.mean[0] @ x < -0.7  # own data wins


def test_thompson_propensity_matches_choice_frequency() -> None:
    rng = np.random.default_rng(0)
    user = BanditState(ARMS, 1)
    x1 = np.array([1.0])
    for r in (1.0, 1.0, 0.0):
        user.update("a", x1, r)
    user.update("b", x1, 0.5)
    post = posterior(user, None, ARMS, 1)
    picks = [thompson.choose(post, x1, rng, noise=0.5) for _ in range(4000)]
    counts = np.bincount([p[0] for p in picks], minlength=3) / len(picks)
    for arm in range(3):
        reported = [p for a, p in picks if a == arm]
        if reported:  # the same propensity every time (same posterior): one number
            assert max(reported) == pytest.approx(min(reported), abs=1e-12)
            # 4 standard errors of a frequency from 4000 choices
            assert reported[0] == pytest.approx(counts[arm], abs=4 * (0.25 / 4000) ** 0.5)


def _win_integral(m: np.ndarray, s: np.ndarray, k: int, points: int = 400_001) -> float:
    """P(arm k wins) by the trapezoid rule on a fine grid of t over every arm's +-12 sd:
    an independent reference for the quadrature (error ~ 1 / points at a step)."""
    others = [a for a in range(len(m)) if a != k]
    if s[k] == 0:  # a point mass: it wins when every other score is below it
        return float(np.prod([thompson._phi(np.array([(m[k] - m[a]) / s[a]]))[0] for a in others]))
    lo, hi = float((m - 12 * s).min()) - 1e-9, float((m + 12 * s).max()) + 1e-9
    t = np.linspace(lo, hi, points)
    pdf = np.exp(-0.5 * ((t - m[k]) / s[k]) ** 2) / (s[k] * np.sqrt(2 * np.pi))
    cdf = np.prod(
        [
            thompson._phi((t - m[a]) / max(s[a], 1e-300)) if s[a] > 0 else (t > m[a]) * 1.0
            for a in others
        ],
        axis=0,
    )
    return float(np.trapezoid(pdf * cdf, t))


@pytest.mark.parametrize(
    ("means", "sds"),
    [
        ([0.1, 0.3, 0.25, -0.2, 0.0, 0.28], [0.3, 0.1, 0.2, 0.5, 0.05, 0.15]),  # mixed
        ([0.0, 0.1, 0.05], [1.0, 1e-4, 0.0]),  # arms far sharper than the others: steps
        ([0.5, 0.5], [0.2, 0.2]),  # a symmetric pair
        ([2.0, 0.0, 0.0], [0.01, 0.01, 0.01]),  # one sure winner
    ],
)
def test_thompson_propensity_matches_the_integral(means: list[float], sds: list[float]) -> None:
    """The quadrature (QUANTILES equal-mass strata of the chosen arm's score) against a
    400,001-point integral: within 2e-4 where the integrand is smooth; an arm whose score
    is far sharper than the chosen one's is a step, which the midpoint rule resolves to
    1/QUANTILES. Also against a million Thompson draws (4 standard errors)."""
    m, s = np.array(means), np.array(sds)
    rng = np.random.default_rng(7)
    draws = 1_000_000
    wins = np.bincount((m + s * rng.standard_normal((draws, len(m)))).argmax(1), minlength=len(m))
    for k in range(len(m)):
        steps = sum(1 for a in range(len(m)) if a != k and s[a] < 1e-3 * s[k])
        tol = 2e-4 + steps / thompson.QUANTILES
        got = thompson.win_probability(m, s, k)
        assert got == pytest.approx(_win_integral(m, s, k), abs=tol), k
        mc = wins[k] / draws
        assert got == pytest.approx(mc, abs=tol + 4 * (max(mc * (1 - mc), 1e-6) / draws) ** 0.5)
    total = sum(thompson.win_probability(m, s, k) for k in range(len(m)))
    assert total == pytest.approx(1.0, abs=1e-3)


def test_linucb_propensities_are_exact() -> None:
    rng = np.random.default_rng(1)
    user = BanditState(ARMS, 1)
    for _ in range(20):
        user.update("c", np.array([1.0]), 1.0)
    post = posterior(user, None, ARMS, 1)
    eps = 0.3
    picks = [linucb.choose(post, np.array([1.0]), rng, alpha=0.1, epsilon=eps) for _ in range(4000)]
    for arm, p in picks:
        expected = eps / 3 + (1 - eps if arm == 2 else 0.0)
        assert p == pytest.approx(expected)
    share_best = np.mean([a == 2 for a, _ in picks])
    assert share_best == pytest.approx(1 - eps + eps / 3, abs=0.03)


def test_state_round_trips_through_proto_and_json() -> None:
    state = BanditState(ARMS, DIM)
    state.update("b", context_features(40, True), 0.75)
    back = BanditState.from_proto(state.to_proto("u", 1), ARMS)
    again = BanditState.from_json(state.to_json(), ARMS, DIM)
    for s in (back, again):
        assert s.seq == 1
        np.testing.assert_allclose(s.stats["b"].xtx, state.stats["b"].xtx)
        assert s.stats["b"].mean_reward == 0.75 and s.stats["a"].n == 0


def test_arms_file(tmp_path: Path) -> None:
    assert load_arms(None) == DEFAULT_ARMS
    good = tmp_path / "arms.toml"
    good.write_text(
        '[[arm]]\nname = "x"\n\n[[arm]]\nname = "y"\nsystem_prompt = "Be brief."\n'
        "temperature = 0.7\n"
    )
    arms = load_arms(good)
    assert [a.name for a in arms] == ["x", "y"] and arms[1].temperature == 0.7
    for text, error in [
        ('[[arm]]\nname = "x"\ncolour = 1\n', "unknown keys"),
        ('[[arm]]\nname = "x"\n[[arm]]\nname = "x"\n', "unique"),
        ('[[arm]]\nname = "x"\ntop_p = 0\n', "top_p"),
        ("", "at least one"),
        ("[[arm]\n", "arms file"),
    ]:
        bad = tmp_path / "bad.toml"
        bad.write_text(text)
        with pytest.raises(ValueError, match=error):
            load_arms(bad)
