"""Bandit math: posterior shrinkage toward the population, propensities, arms files."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from loraloop.core.bandits import linucb, thompson
from loraloop.core.bandits.arms import DEFAULT_ARMS, load_arms
from loraloop.core.bandits.features import DIM, context_features
from loraloop.core.bandits.linear import (
    POPULATION,
    RESERVED_ARM_NAMES,
    SCALE_PRIOR,
    BanditState,
    posterior,
    reward_scale,
)
from loraloop.core.gen.loraloop.v1 import events_pb2
from loraloop.core.user_ids import user_id_error

ARMS = ["a", "b", "c"]


def test_population_key_can_never_be_a_user_id() -> None:
    assert user_id_error(POPULATION) is not None


def test_posterior_is_ridge_regression_by_hand() -> None:
    """Prior mean: the reference reward on the bias (the user's mean here, no population);
    prior precision: ridge on the bias, slope_ridge on the context coefficient."""
    user = BanditState(ARMS, 2)
    x = np.array([1.0, 0.5])
    for r in (1.0, 0.0, 1.0):
        user.update("a", x, r)
    post = posterior(user, None, ARMS, 2, ridge=1.0, slope_ridge=10.0)
    prior = np.diag([1.0, 10.0])
    a_mat = prior + 3 * np.outer(x, x)
    expected = np.linalg.solve(a_mat, prior @ [2 / 3, 0.0] + 2.0 * x)
    np.testing.assert_allclose(post.mean[0], expected, atol=1e-12)
    np.testing.assert_allclose(post.precision_inv[0], np.linalg.inv(a_mat))
    np.testing.assert_allclose(post.mean[1], [2 / 3, 0.0])  # no data: the prior mean


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
    for name, r in (("a", 0.0), ("b", 0.0)) * 20 + (("c", 1.0),) * 20:
        user.update(name, np.array([1.0]), r)
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
        *((f'[[arm]]\nname = "{name}"\n', "reserved") for name in RESERVED_ARM_NAMES),
    ]:
        bad = tmp_path / "bad.toml"
        bad.write_text(text)
        with pytest.raises(ValueError, match=error):
            load_arms(bad)


def _history(
    rng: np.random.Generator, n: int, unit: tuple[float, float] = (1.0, 0.0)
) -> list[tuple[str, np.ndarray, float]]:
    """n (arm, context, reward) with {0, 1} rewards mapped to scale * r + shift."""
    scale, shift = unit
    chance = {"a": 0.3, "b": 0.5, "c": 0.6}
    out = []
    for _ in range(n):
        arm = str(rng.choice(ARMS))
        x = context_features(int(rng.integers(1, 400)), bool(rng.random() < 0.5))
        out.append((arm, x, scale * float(rng.random() < chance[arm]) + shift))
    return out


def _states(
    history: list[tuple[str, np.ndarray, float]], users: int = 1
) -> tuple[BanditState, BanditState]:
    """The first user's and the population's state after `history`, updated as the
    learner does (round-robin over `users` users, every update also pooled)."""
    own, pop = BanditState(ARMS, DIM), BanditState(ARMS, DIM)
    for i, (arm, x, r) in enumerate(history):
        if i % users == 0:
            own.update(arm, x, r)
        pop.update(arm, x, r)
    return own, pop


def test_spread_is_the_pooled_within_arm_variance() -> None:
    history = _history(np.random.default_rng(3), 300)
    state, _ = _states(history)
    rewards = {a: np.array([r for arm, _, r in history if arm == a]) for a in ARMS}
    within = sum(float(((v - v.mean()) ** 2).sum()) for v in rewards.values())
    assert state.m2 == pytest.approx(within)
    assert state.m2_n == len(history) - len(ARMS)


def test_reward_scale_starts_at_the_prior_and_follows_the_rewards_unit() -> None:
    assert reward_scale(None, None) == SCALE_PRIOR
    rng = np.random.default_rng(4)
    history = _history(rng, 2000)
    _, pop = _states(history)
    within = np.sqrt(pop.m2 / pop.m2_n)
    assert reward_scale(None, pop) == pytest.approx(within, rel=0.01)
    base = reward_scale(*_states(history, users=10))
    for unit in ((2.0, -1.0), (0.3, 0.0), (10.0, 5.0)):
        scaled = _states([(a, x, unit[0] * r + unit[1]) for a, x, r in history], users=10)
        assert reward_scale(*scaled) == pytest.approx(unit[0] * base, rel=0.02)


@pytest.mark.parametrize("unit", [(2.0, -1.0), (0.3, 0.0), (5.0, 2.0)])
def test_choice_distribution_does_not_depend_on_the_rewards_unit(
    unit: tuple[float, float],
) -> None:
    """Rewards r and a r + c: scores a s + c exactly, their spread a sd up to the spread
    prior (worth SCALE_PRIOR_WEIGHT updates), so every arm's choice probability agrees."""
    history = _history(np.random.default_rng(5), 200)
    base = _states(history, users=4)
    scaled = _states([(a, x, unit[0] * r + unit[1]) for a, x, r in history], users=4)
    post, post_scaled = posterior(*base, ARMS, DIM), posterior(*scaled, ARMS, DIM)
    for x in (context_features(10, False), context_features(300, True)):
        m, sd = thompson.score_distribution(post, x, 0.5)
        m2, sd2 = thompson.score_distribution(post_scaled, x, 0.5)
        np.testing.assert_allclose(m2, unit[0] * m + unit[1], atol=1e-9)
        np.testing.assert_allclose(sd2, unit[0] * sd, rtol=0.03)
        for k in range(len(ARMS)):
            p, p2 = thompson.win_probability(m, sd, k), thompson.win_probability(m2, sd2, k)
            assert p2 == pytest.approx(p, abs=0.01)
        ucb, _ = linucb.choose(post, x, np.random.default_rng(0), epsilon=0.0)
        ucb2, _ = linucb.choose(post_scaled, x, np.random.default_rng(0), epsilon=0.0)
        assert ucb == ucb2


def _learning_curve(unit: tuple[float, float], seed: int) -> float:
    """Mean success chance of Thompson's choices in a 3-arm world (20 users, 60 rounds
    each), learning from {0, 1} rewards mapped to unit[0] * r + unit[1]."""
    rng = np.random.default_rng(seed)
    tastes = rng.uniform(0.1, 0.9, size=(20, len(ARMS)))
    users = [BanditState(ARMS, DIM) for _ in range(20)]
    pop = BanditState(ARMS, DIM)
    got = 0.0
    for t in range(1200):
        u = t % 20
        x = context_features(int(rng.integers(1, 400)), bool(rng.random() < 0.5))
        k, _ = thompson.choose(posterior(users[u], pop, ARMS, DIM), x, rng)
        r = unit[0] * float(rng.random() < tastes[u, k]) + unit[1]
        users[u].update(ARMS[k], x, r)
        pop.update(ARMS[k], x, r)
        got += tastes[u, k] / tastes[u].max()
    return got / 1200


def test_learning_does_not_depend_on_the_rewards_unit() -> None:
    """Same seeds, rewards in {0, 1}, {-1, 1} and {0, 0.3}: the same share of the best
    arm's reward (the runs diverge after the first different choice, hence a tolerance:
    the spread over seeds of one unit is about 0.02)."""
    shares = {
        unit: np.mean([_learning_curve(unit, seed) for seed in range(4)])
        for unit in ((1.0, 0.0), (2.0, -1.0), (0.3, 0.0))
    }
    assert max(shares.values()) - min(shares.values()) < 0.03, shares
    assert min(shares.values()) > 0.85, shares  # and it does learn (uniform: about 0.6)


def test_a_context_feature_that_does_not_matter_barely_moves_the_score() -> None:
    """The strong prior on context coefficients: 30 rewards that ignore the context move
    the score across contexts less than a weak prior would; 300 that follow the
    conversation flag still learn it."""
    rng = np.random.default_rng(6)
    own = BanditState(ARMS, DIM)
    for i in range(30):
        own.update("a", context_features(int(rng.integers(1, 400)), bool(i % 3)), float(i % 2))
    lo, hi = context_features(1, False), context_features(256, True)

    def spread(post: thompson.Posterior) -> float:
        return abs(float(post.mean[0] @ hi - post.mean[0] @ lo))

    strong, weak = posterior(own, None, ARMS, DIM), posterior(own, None, ARMS, DIM, slope_ridge=1)
    assert spread(strong) < 0.5 * spread(weak)
    learns = BanditState(ARMS, DIM)
    for i in range(300):
        chat = bool(i % 2)
        learns.update("a", context_features(int(rng.integers(1, 400)), chat), float(chat))
    post = posterior(learns, None, ARMS, DIM)
    chat_on, chat_off = context_features(100, True), context_features(100, False)
    assert post.mean[0] @ chat_on - post.mean[0] @ chat_off > 0.8


def test_thompson_propensity_stays_accurate_on_a_small_reward_scale() -> None:
    """Rewards in {0, 0.3}: the spread the propensity integrates is the estimated one."""
    rng = np.random.default_rng(8)
    own, pop = _states(_history(rng, 40, unit=(0.3, 0.0)))
    post = posterior(own, pop, ARMS, DIM)
    assert post.scale < 0.2
    x = context_features(50, True)
    picks = [thompson.choose(post, x, rng) for _ in range(4000)]
    counts = np.bincount([a for a, _ in picks], minlength=len(ARMS)) / len(picks)
    for arm in range(len(ARMS)):
        reported = [p for a, p in picks if a == arm]
        if reported:
            assert reported[0] == pytest.approx(counts[arm], abs=4 * (0.25 / 4000) ** 0.5)


def _old_from_json(data: dict[str, object], arms: list[str], dim: int) -> dict[str, int]:
    """Pulls per arm as the code before the spread read a to_json dict."""
    return {a: int(data[a]["n"]) for a in arms if a in data}  # type: ignore[index]


def _old_from_proto(msg: events_pb2.BanditState, arms: list[str]) -> dict[str, int]:
    """Pulls per arm as the code before the spread read a BanditState record."""
    return {
        a.arm: a.pulls
        for a in msg.arms
        if a.arm in arms and len(a.xtr) == msg.dim and len(a.xtx) == msg.dim**2
    }


def test_state_written_before_the_spread_loads_and_new_state_reads_in_old_code() -> None:
    x = context_features(40, True)
    # exactly what to_json and to_proto wrote before the spread existed
    old_json = {
        "a": {"xtx": np.outer(x, x).ravel().tolist(), "xtr": x.tolist(), "n": 1, "reward_sum": 1},
        "b": {"xtx": [0.0] * DIM**2, "xtr": [0.0] * DIM, "n": 0, "reward_sum": 0.0},
        "_seq": 1,
        "_dim": DIM,
    }
    old_proto = events_pb2.BanditState(
        key="u",
        seq=1,
        dim=DIM,
        arms=[
            events_pb2.ArmStatistics(
                arm="a", xtx=np.outer(x, x).ravel().tolist(), xtr=x.tolist(), pulls=1, reward_sum=1
            )
        ],
    )
    for state in (
        BanditState.from_json(old_json, ARMS, DIM),
        BanditState.from_proto(
            events_pb2.BanditState.FromString(old_proto.SerializeToString()), ARMS
        ),
    ):
        assert (state.seq, state.m2, state.m2_n) == (1, 0.0, 0)
        assert state.stats["a"].n == 1 and state.stats["a"].mean_reward == 1.0
        assert reward_scale(state, None) == SCALE_PRIOR  # no spread known yet: the prior
        state.update("a", x, 0.0)  # the spread starts with the next reward
        assert (state.m2, state.m2_n) == (pytest.approx(0.5), 1)
        np.testing.assert_allclose(state.stats["a"].xtx, 2 * np.outer(x, x))
    # new state, read back by new code and by the code before the spread
    state, _ = _states(_history(np.random.default_rng(9), 50))
    msg = state.to_proto("u", 1)
    assert msg.reward_m2_n == state.m2_n > 0 and msg.reward_m2 == state.m2
    pulls = {a: s.n for a, s in state.stats.items()}
    assert (
        _old_from_proto(msg, ARMS) == pulls and _old_from_json(state.to_json(), ARMS, DIM) == pulls
    )
    for back in (
        BanditState.from_proto(msg, ARMS),
        BanditState.from_json(state.to_json(), ARMS, DIM),
    ):
        assert (back.m2, back.m2_n, back.seq) == (state.m2, state.m2_n, state.seq)
        assert {a: s.n for a, s in back.stats.items()} == pulls
