"""Off-policy estimators against values known by construction."""

from __future__ import annotations

import numpy as np
import pytest

from loraloop.learner import ope

THETA = np.array([[0.2, 0.5], [0.6, -0.3], [0.1, 0.1]])  # true reward weights per arm


def _world(n: int, rng: np.random.Generator, noise: float = 0.3) -> ope.Logs:
    """Contexts [1, u], a softmax logging policy with known propensities, linear rewards."""
    x = np.column_stack([np.ones(n), rng.uniform(-1, 1, n)])
    logits = np.column_stack([x[:, 1], -x[:, 1], np.zeros(n)])
    probs = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    actions = np.array([rng.choice(3, p=p) for p in probs])
    rewards = (x @ THETA.T)[np.arange(n), actions] + rng.normal(0, noise, n)
    return ope.Logs(x, actions, probs[np.arange(n), actions], rewards)


def _true_value(policy: ope.Policy) -> float:
    """E_x sum_a pi(a|x) theta_a . x with u ~ U(-1, 1), by fine quadrature."""
    u = np.linspace(-1, 1, 20001)
    x = np.column_stack([np.ones_like(u), u])
    return float((policy(x) * (x @ THETA.T)).sum(axis=1).mean())


def test_hand_computed_tiny_log() -> None:
    logs = ope.Logs(
        contexts=np.ones((4, 1)),
        actions=np.array([0, 1, 0, 1]),
        propensities=np.array([0.5, 0.5, 0.25, 0.75]),
        rewards=np.array([1.0, 0.0, 0.5, 1.0]),
    )
    always0 = ope.fixed_arm(0, 2)
    # weights 2, 0, 4, 0 -> IPS (2*1 + 4*0.5) / 4 = 1.0; SNIPS (2 + 2) / 6
    assert ope.ips(logs, always0).value == pytest.approx(1.0)
    assert ope.snips(logs, always0).value == pytest.approx(4 / 6)
    uniform = ope.ips(logs, ope.uniform(2)).value
    assert uniform == pytest.approx((0.5 / 0.5 * 1 + 0 + 0.5 / 0.25 * 0.5 + 0.5 / 0.75 * 1) / 4)


@pytest.mark.parametrize("name", ["always 0", "always 1", "uniform", "greedy"])
def test_estimators_are_unbiased_by_simulation(name: str) -> None:
    policies = {
        "always 0": ope.fixed_arm(0, 3),
        "always 1": ope.fixed_arm(1, 3),
        "uniform": ope.uniform(3),
        "greedy": ope.greedy(THETA),
    }
    policy = policies[name]
    truth = _true_value(policy)
    rng = np.random.default_rng(7)
    draws = {"ips": [], "dr": [], "snips": []}
    for _ in range(200):
        logs = _world(300, rng)
        draws["ips"].append(ope.ips(logs, policy).value)
        draws["dr"].append(ope.doubly_robust(logs, policy, 3).value)
        draws["snips"].append(ope.snips(logs, policy).value)
    for estimator in ("ips", "dr"):
        values = np.array(draws[estimator])
        se_of_mean = values.std(ddof=1) / np.sqrt(len(values))
        assert abs(values.mean() - truth) < 4 * se_of_mean + 1e-3, (estimator, truth)
    # SNIPS is biased, but only O(1/n): close to the truth at n = 300
    assert abs(np.mean(draws["snips"]) - truth) < 0.02
    # with the right reward model class, DR has lower variance than IPS
    assert np.std(draws["dr"]) < np.std(draws["ips"])


def test_confidence_intervals_cover_the_truth_about_95_percent() -> None:
    policy = ope.fixed_arm(1, 3)
    truth = _true_value(policy)
    rng = np.random.default_rng(11)
    covered = 0
    for _ in range(300):
        est = ope.doubly_robust(_world(400, rng), policy, 3)
        covered += abs(est.value - truth) <= 1.96 * est.stderr
    assert 0.90 <= covered / 300 <= 0.99


def test_evaluate_reports_every_estimator() -> None:
    logs = _world(500, np.random.default_rng(3))
    out = ope.evaluate(logs, {"u": ope.uniform(3)}, 3)
    assert set(out["u"]) == {"ips", "snips", "dr"}
    assert all(np.isfinite(e.value) and e.stderr > 0 for e in out["u"].values())


def test_zero_propensity_is_refused() -> None:
    with pytest.raises(ValueError, match="propensity"):
        ope.Logs(np.ones((2, 1)), np.array([0, 1]), np.array([0.5, 0.0]), np.zeros(2))


def test_doubly_robust_with_a_given_reward_model() -> None:
    """An operator's own q-hat: by hand on a tiny log, as a callable or an array; and with
    the true q DR stays unbiased when the logged propensities are wrong (its other half),
    while IPS on those propensities is off."""
    logs = ope.Logs(
        contexts=np.ones((2, 1)),
        actions=np.array([0, 1]),
        propensities=np.array([0.5, 0.5]),
        rewards=np.array([1.0, 0.0]),
    )
    q = np.array([[0.8, 0.2], [0.6, 0.4]])
    always0 = ope.fixed_arm(0, 2)
    # row 0: 0.8 + 2 * (1 - 0.8) = 1.2; row 1: 0.6 + 0 = 0.6 -> 0.9
    assert ope.doubly_robust(logs, always0, 2, q).value == pytest.approx(0.9)
    assert ope.doubly_robust(logs, always0, 2, lambda x: q).value == pytest.approx(0.9)
    with pytest.raises(ValueError, match=r"shape \(2, 2\)"):
        ope.doubly_robust(logs, always0, 2, q[:, :1])

    policy = ope.fixed_arm(1, 3)
    truth = _true_value(policy)
    rng = np.random.default_rng(5)
    dr, ips = [], []
    for _ in range(100):
        good = _world(300, rng)
        wrong = ope.Logs(  # arm 1's propensities logged 1.5x too high
            good.contexts,
            good.actions,
            np.minimum(good.propensities * np.where(good.actions == 1, 1.5, 1.0), 1.0),
            good.rewards,
        )
        dr.append(ope.doubly_robust(wrong, policy, 3, lambda x: x @ THETA.T).value)
        ips.append(ope.ips(wrong, policy).value)
    se = np.std(dr, ddof=1) / np.sqrt(len(dr))
    assert abs(np.mean(dr) - truth) < 4 * se + 1e-3
    assert abs(np.mean(ips) - truth) > 0.05  # the misstated propensities bias IPS
    out = ope.evaluate(good, {"p": policy}, 3, q_hat=lambda x: x @ THETA.T)
    assert out["p"]["dr"].value == pytest.approx(
        ope.doubly_robust(good, policy, 3, lambda x: x @ THETA.T).value
    )
