"""REINFORCE step on the tiny Llama: direction of the update, zero-advantage no-op,
batched == per-user (in float64, up to rounding), per-user clipping, baseline and loss by
hand."""

from __future__ import annotations

import copy
import dataclasses
import math
from collections.abc import Iterator

import pytest
import torch

from loraloop.core.logprobs import response_distributions, response_logprobs
from loraloop.core.model_loading import LoadedModel, load_model
from loraloop.core.multi_lora import LoRABank, LoRAWeights
from loraloop.core.sampling import nucleus_log_softmax
from loraloop.core.settings import Settings
from loraloop.learner.algos.reinforce import AdamState, ReinforceConfig, UserBatch, reinforce_step
from loraloop.learner.user_models import initial_weights
from tests.tolerances import adam_atol, backward_atol, float64_model, rounding_atol

SLOTS = 4
# The exact-KL penalty (kl_coef) is newer than the REINFORCE core: the REINFORCE checks
# below switch it off, so they check the policy-gradient arithmetic on its own; the KL
# term has its own tests at the end.
HAS_KL = "kl_coef" in {f.name for f in dataclasses.fields(ReinforceConfig)}


def config(**kw) -> ReinforceConfig:
    """The plain running-baseline REINFORCE step the hand-derived checks are written for."""
    if HAS_KL:
        kw.setdefault("kl_coef", 0.0)
    kw.setdefault("loo_baseline", False)
    return ReinforceConfig(**kw)


@pytest.fixture(scope="module")
def lm(tmp_path_factory: pytest.TempPathFactory) -> LoadedModel:
    return load_model(Settings(adapter_store=tmp_path_factory.mktemp("store")), slots=SLOTS)


@pytest.fixture(scope="module")
def lm64(tmp_path_factory: pytest.TempPathFactory) -> LoadedModel:
    """The same model and bank in float64, for the checks that two paths compute the same
    step: batched and per user sum in other orders, which float32 cannot tell from a bug
    once Adam has divided by sqrt(v) + eps (see tests/tolerances.py)."""
    settings = Settings(adapter_store=tmp_path_factory.mktemp("store64"))
    return float64_model(load_model(settings, slots=SLOTS))


@pytest.fixture(autouse=True)
def _clean_bank(lm: LoadedModel, lm64: LoadedModel) -> Iterator[None]:
    yield
    for m in (lm, lm64):
        m.bank.set_rows(None)
        for slot in range(1, SLOTS):
            m.bank.clear(slot)


def encode(lm: LoadedModel, text: str) -> list[int]:
    return list(lm.tokenizer(text)["input_ids"])


def random_weights(bank: LoRABank, seed: int, scale: float = 0.05) -> LoRAWeights:
    """Non-zero A and B, so both get gradients."""
    gen = torch.Generator().manual_seed(seed)
    w = LoRAWeights(bank.rank, bank.alpha)
    for name, layer in bank.layers.items():
        w.a[name] = torch.randn(bank.rank, layer.base.in_features, generator=gen) * scale
        w.b[name] = torch.randn(layer.base.out_features, bank.rank, generator=gen) * scale
    return w


def mean_logps(lm: LoadedModel, w: LoRAWeights, prompts, responses) -> list[float]:
    lm.bank.load(1, w)
    with torch.no_grad():
        lps = response_logprobs(lm.model, lm.bank, prompts, responses, [1] * len(prompts))
    return [float(lp.mean()) for lp in lps]


def batch(w: LoRAWeights, prompts, responses, rewards, baseline=0.0) -> UserBatch:
    return UserBatch(copy.deepcopy(w), AdamState(), baseline, prompts, responses, rewards)


def diff(a: LoRAWeights, b: LoRAWeights) -> float:
    return max(
        max(float((a.a[n] - b.a[n]).abs().max()), float((a.b[n] - b.b[n]).abs().max())) for n in a.a
    )


def assert_weights_close(a: LoRAWeights, b: LoRAWeights, atol: float) -> None:
    assert set(a.a) == set(b.a)
    for n in a.a:
        torch.testing.assert_close(a.a[n], b.a[n], atol=atol, rtol=0)
        torch.testing.assert_close(a.b[n], b.b[n], atol=atol, rtol=0)


def float32_sum_atol(lm: LoadedModel, scale: float) -> float:
    """Losses and KLs: sums over the vocabulary of values of total size `scale`, bounded
    at float32 even in the float64 model, whose RMSNorm rounds to float32 (tolerances.py)."""
    return rounding_atol(torch.float32, scale, lm.model.config.vocab_size)


def pg_scale(lm: LoadedModel, user: UserBatch, advantages: list[float]) -> float:
    """Size of the policy-gradient loss's terms, sum_i |A_i * mean_t log p| / n (the loss
    itself can be much smaller: advantages of both signs cancel)."""
    lps = mean_logps(lm, user.weights, user.prompts, user.responses)
    return sum(abs(a * lp) for a, lp in zip(advantages, lps, strict=True)) / len(lps)


def kl_scale(lm: LoadedModel, kl: float) -> float:
    """Size of a KL's terms: sum_v p |log p - log p0| <= H(p) + H(p, p0) = 2 H(p) + KL, and
    H(p) <= log V."""
    return 2 * math.log(lm.model.config.vocab_size) + kl


def grad_atol(lm: LoadedModel, grad_norm: float) -> float:
    """How far two summation orders may move a user's gradient: every component is at most
    the user's gradient norm."""
    return backward_atol(lm.model.config, next(lm.model.parameters()).dtype, grad_norm)


def adapter_size(lm: LoadedModel) -> int:
    """Number of one user's adapter weights (the norm sums that many squares)."""
    return sum(
        layer.lora_A[0].numel() + layer.lora_B[0].numel() for layer in lm.bank.layers.values()
    )


@pytest.fixture(scope="module")
def data(lm: LoadedModel):
    prompts = [
        encode(lm, "user: How do I cook rice?\nassistant:"),
        encode(lm, "user: What should I pack for Tokyo?\nassistant:"),
    ]
    responses = [
        encode(lm, " Rinse it, then simmer for twenty minutes.")[1:],
        encode(lm, " Pack light shoes and an umbrella.")[1:],
    ]
    return prompts, responses


@pytest.mark.parametrize("reward", [1.0, -1.0])
def test_update_moves_logprob_in_the_rewarded_direction(lm, data, reward: float) -> None:
    prompts, responses = data
    w0 = initial_weights(lm.bank, "alice", seed=0)  # how a new user starts: B = 0
    before = mean_logps(lm, w0, prompts[:1], responses[:1])[0]
    (upd,) = reinforce_step(
        lm, [batch(w0, prompts[:1], responses[:1], [reward])], config(learning_rate=1e-3)
    )
    after = mean_logps(lm, upd.weights, prompts[:1], responses[:1])[0]
    if reward > 0:
        assert after > before + 1e-3, (before, after)
    else:
        assert after < before - 1e-3, (before, after)
    assert upd.grad_norm > 0
    assert upd.mean_advantage == reward


def test_two_users_opposite_rewards_in_one_step(lm, data) -> None:
    prompts, responses = data
    wa, wb = random_weights(lm.bank, 1), random_weights(lm.bank, 2)
    before_a = mean_logps(lm, wa, prompts, responses)
    before_b = mean_logps(lm, wb, prompts, responses)
    ua, ub = reinforce_step(
        lm,
        [batch(wa, prompts, responses, [1.0, 1.0]), batch(wb, prompts, responses, [-1.0, -1.0])],
        config(learning_rate=1e-3),
    )
    after_a = mean_logps(lm, ua.weights, prompts, responses)
    after_b = mean_logps(lm, ub.weights, prompts, responses)
    assert all(x > y for x, y in zip(after_a, before_a, strict=True))
    assert all(x < y for x, y in zip(after_b, before_b, strict=True))


def test_zero_advantage_leaves_weights_unchanged(lm, data) -> None:
    prompts, responses = data
    w = random_weights(lm.bank, 3)
    user = batch(w, prompts, responses, [0.4, 0.4], baseline=0.4)
    (upd,) = reinforce_step(lm, [user], config())
    assert upd.grad_norm == 0.0
    assert upd.loss == 0.0
    assert upd.mean_advantage == 0.0
    for n in w.a:
        assert torch.equal(upd.weights.a[n], w.a[n])
        assert torch.equal(upd.weights.b[n], w.b[n])
    assert user.adam.step == 0  # a numerically zero gradient takes no Adam step


def test_batched_users_equal_separate_steps(lm64, data) -> None:
    lm = lm64  # the same math in another summation order: float64, see tests/tolerances.py
    prompts, responses = data
    extra_p = [encode(lm, "user: Any tips for tennis?\nassistant:")]
    extra_r = [encode(lm, " Keep your eye on the ball.")[1:]]
    wa, wb = random_weights(lm.bank, 4), random_weights(lm.bank, 5)
    cfg = config(learning_rate=2e-3, max_grad_norm=0.5)

    def make():
        return (
            batch(wa, prompts, responses, [0.9, -0.2], baseline=0.1),
            batch(wb, extra_p, extra_r, [-0.7], baseline=0.3),
        )

    a_alone, b_alone = make()
    a_both, b_both = make()
    drift = [0.0, 0.0]  # per user: how far the weights may have drifted apart so far
    g_atol = [0.0, 0.0]
    for _ in range(2):  # two steps, so Adam's carried state is compared too
        scales = [pg_scale(lm, u, [r - u.baseline for r in u.rewards]) for u in (a_alone, b_alone)]
        (ua,) = reinforce_step(lm, [a_alone], cfg)
        (ub,) = reinforce_step(lm, [b_alone], cfg)
        ua2, ub2 = reinforce_step(lm, [a_both, b_both], cfg)
        for k, (one, two) in enumerate(((ua, ua2), (ub, ub2))):
            g_atol[k] = max(g_atol[k], grad_atol(lm, one.grad_norm))
            drift[k] += adam_atol(g_atol[k], cfg.learning_rate, cfg.adam_eps, steps=1)
            assert_weights_close(one.weights, two.weights, atol=drift[k])
            assert one.loss == pytest.approx(two.loss, abs=float32_sum_atol(lm, scales[k]))
            norm_atol = math.sqrt(adapter_size(lm)) * g_atol[k]  # |d||g||| <= ||dg||
            assert one.grad_norm == pytest.approx(two.grad_norm, abs=norm_atol, rel=0)
            assert one.baseline == pytest.approx(two.baseline)
        assert diff(ua.weights, a_alone.weights) > 1e-4  # the step did something
        for alone, both, ualone, uboth in ((a_alone, a_both, ua, ua2), (b_alone, b_both, ub, ub2)):
            alone.weights, both.weights = ualone.weights, uboth.weights
            alone.baseline, both.baseline = ualone.baseline, uboth.baseline
    assert a_alone.adam.step == a_both.adam.step == 2
    for key in a_alone.adam.m:
        # m: a weighted mean of the clipped gradients (clipping at most doubles a change)
        m_alone, m_both = a_alone.adam.m[key], a_both.adam.m[key]
        torch.testing.assert_close(m_alone, m_both, atol=2 * g_atol[0], rtol=0)


def _manual_grad_norm(lm, w, prompts, responses, rewards, baseline) -> float:
    """The per-user gradient norm, computed independently with autograd."""
    bank = lm.bank
    bank.load(1, w)
    params = bank.parameters()
    for p in params:
        p.requires_grad_(True)
        p.grad = None
    with torch.enable_grad():
        lps = response_logprobs(
            lm.model, bank, prompts, responses, [1] * len(prompts), lm.tokenizer.pad_token_id
        )
        loss = sum(-(r - baseline) * lp.mean() for r, lp in zip(rewards, lps, strict=True))
        (loss / len(rewards)).backward()
    sq = sum(
        float(layer.lora_A.grad[1].square().sum() + layer.lora_B.grad[1].square().sum())
        for layer in bank.layers.values()
    )
    for p in params:
        p.requires_grad_(False)
        p.grad = None
    return math.sqrt(sq)


def _m_norm(adam: AdamState) -> float:
    return math.sqrt(sum(float(m.square().sum()) for m in adam.m.values()))


def test_per_user_clipping(lm, data) -> None:
    prompts, responses = data
    w = random_weights(lm.bank, 6)
    rewards = [1.0, -0.5]
    norm = _manual_grad_norm(lm, w, prompts, responses, rewards, baseline=0.0)
    assert norm > 0
    b1 = ReinforceConfig().adam_betas[0]
    results = {}
    for max_norm in (1e6, norm / 4, 1e-12):
        user = batch(w, prompts, responses, rewards)
        (upd,) = reinforce_step(lm, [user], config(max_grad_norm=max_norm))
        # the reported norm is the one before clipping, whatever the clip
        assert upd.grad_norm == pytest.approx(norm, rel=1e-4)
        # Adam's first moment after one step is (1 - b1) * the clipped gradient
        assert _m_norm(user.adam) / (1 - b1) == pytest.approx(min(norm, max_norm), rel=1e-4)
        results[max_norm] = diff(upd.weights, w)
    # Adam is scale-free until the clipped gradient nears eps: a tiny clip barely moves
    assert results[1e6] == pytest.approx(ReinforceConfig().learning_rate, rel=1e-3)
    assert results[1e-12] < results[1e6] / 100


def test_clipping_is_per_user(lm, data) -> None:
    prompts, responses = data
    wa, wb = random_weights(lm.bank, 7), random_weights(lm.bank, 8)
    # user b has a 10x larger advantage, so a 10x larger gradient; clipping b must not
    # scale a down
    na = _manual_grad_norm(lm, wa, prompts[:1], responses[:1], [0.1], 0.0)
    nb = _manual_grad_norm(lm, wb, prompts[1:], responses[1:], [1.0], 0.0)
    clip = 2 * na
    assert nb > clip
    ua, ub = (
        batch(wa, prompts[:1], responses[:1], [0.1]),
        batch(wb, prompts[1:], responses[1:], [1.0]),
    )
    reinforce_step(lm, [ua, ub], config(max_grad_norm=clip))
    b1 = ReinforceConfig().adam_betas[0]
    assert _m_norm(ua.adam) / (1 - b1) == pytest.approx(na, rel=1e-4)
    assert _m_norm(ub.adam) / (1 - b1) == pytest.approx(clip, rel=1e-4)


@pytest.mark.parametrize(
    ("b0", "rewards", "decay"),
    [
        (0.2, [1.0, -0.5], 0.7),
        (0.0, [0.3], 0.9),
        (-0.5, [1.0, 1.0, -1.0], 0.0),
    ],
)
def test_baseline_update(lm, data, b0: float, rewards: list[float], decay: float) -> None:
    prompts, responses = data
    n = len(rewards)
    ps, rs = (prompts * 2)[:n], (responses * 2)[:n]
    (upd,) = reinforce_step(
        lm, [batch(random_weights(lm.bank, 9), ps, rs, rewards, b0)], config(baseline_decay=decay)
    )
    mean_r = sum(rewards) / n
    assert upd.baseline == pytest.approx(decay * b0 + (1 - decay) * mean_r)
    assert upd.mean_reward == pytest.approx(mean_r)
    assert upd.mean_advantage == pytest.approx(mean_r - b0)


def test_loss_single_token_by_hand(lm) -> None:
    prompt, response = [1, 57, 300], [412]
    w = initial_weights(lm.bank, "bob", seed=0)  # B = 0: the policy is the base model
    with torch.no_grad():
        base_logits = lm.model(input_ids=torch.tensor([prompt])).logits
    logp = float(base_logits[0, -1].log_softmax(-1)[412])
    r, b = 0.8, 0.3
    (upd,) = reinforce_step(lm, [batch(w, [prompt], [response], [r], b)], config())
    assert upd.loss == pytest.approx(-(r - b) * logp, rel=1e-5)
    assert upd.loss > 0  # logp < 0 and a positive advantage


def test_loss_is_mean_over_samples_of_mean_over_tokens(lm, data) -> None:
    prompts, responses = data
    w = random_weights(lm.bank, 10)
    rewards, b = [0.9, -0.4], 0.1
    lps = [torch.tensor(x) for x in mean_logps(lm, w, prompts, responses)]
    want = -sum((r - b) * float(lp) for r, lp in zip(rewards, lps, strict=True)) / 2
    (upd,) = reinforce_step(lm, [batch(w, prompts, responses, rewards, b)], config())
    assert upd.loss == pytest.approx(want, rel=1e-5)


def test_first_adam_step_moves_each_weight_by_about_lr(lm, data) -> None:
    prompts, responses = data
    w = random_weights(lm.bank, 11)
    lr = 3e-3
    (upd,) = reinforce_step(
        lm, [batch(w, prompts, responses, [1.0, 0.5])], config(learning_rate=lr)
    )
    deltas = torch.cat(
        [(upd.weights.b[n] - w.b[n]).flatten() for n in w.b]
        + [(upd.weights.a[n] - w.a[n]).flatten() for n in w.a]
    ).abs()
    # bias-corrected Adam: |update| = lr * |g| / (|g| + eps) <= lr, ~lr unless g ~ eps
    assert float(deltas.max()) <= lr * (1 + 1e-5)
    assert float((deltas > 0.99 * lr).double().mean()) > 0.9


def test_bank_is_left_frozen_and_gradient_free(lm, data) -> None:
    prompts, responses = data
    reinforce_step(
        lm, [batch(random_weights(lm.bank, 12), prompts, responses, [1.0, 0.0])], config()
    )
    for p in lm.bank.parameters():
        assert not p.requires_grad and p.grad is None
    assert not any(p.requires_grad for p in lm.model.parameters())


def test_too_many_users_is_refused(lm, data) -> None:
    prompts, responses = data
    users = [
        batch(random_weights(lm.bank, i), prompts[:1], responses[:1], [1.0]) for i in range(SLOTS)
    ]
    with pytest.raises(ValueError, match="slots"):
        reinforce_step(lm, users, config())


# --- exact KL penalty to the base model (kl_coef) ----------------------------------------

needs_kl = pytest.mark.skipif(not HAS_KL, reason="ReinforceConfig has no kl_coef yet")


def _kl_by_hand(lm, w, prompts, responses) -> list[float]:
    """mean_t sum_v p_u(v) (log p_u(v) - log p_0(v)) per sample, from plain forwards."""
    out = []
    for p, r in zip(prompts, responses, strict=True):
        x = torch.tensor([p + r])
        with torch.no_grad(), lm.bank.rows(None):
            base = lm.model(input_ids=x).logits[0].float().log_softmax(-1)
        lm.bank.load(1, w)
        with torch.no_grad(), lm.bank.rows([1]):
            pol = lm.model(input_ids=x).logits[0].float().log_softmax(-1)
        sl = slice(len(p) - 1, len(p) - 1 + len(r))
        out.append(float((pol[sl].exp() * (pol[sl] - base[sl])).sum(-1).mean()))
    return out


@needs_kl
def test_kl_is_zero_at_the_base_model(lm, data) -> None:
    prompts, responses = data
    w = initial_weights(lm.bank, "carol", seed=0)  # B = 0: the policy is the base model
    user = batch(w, prompts, responses, [0.5, 0.5], baseline=0.5)  # advantage 0
    (upd,) = reinforce_step(lm, [user], ReinforceConfig(kl_coef=0.5))
    assert upd.kl == pytest.approx(0.0, abs=1e-6)
    # KL's gradient vanishes at its minimum and the advantage is 0: only float noise is left
    assert upd.grad_norm < 1e-5


@needs_kl
def test_kl_at_the_base_model_with_zero_advantage_moves_nothing(lm, data) -> None:
    prompts, responses = data
    w = initial_weights(lm.bank, "carol", seed=0)
    user = batch(w, prompts, responses, [0.5, 0.5], baseline=0.5)
    (upd,) = reinforce_step(lm, [user], ReinforceConfig(kl_coef=0.5))
    assert diff(upd.weights, w) < 1e-6


@needs_kl
def test_kl_value_and_loss_by_hand(lm64, data) -> None:
    lm = lm64  # one row at a time vs the step's batch: float64, see tests/tolerances.py
    prompts, responses = data
    w = random_weights(lm.bank, 13, scale=0.1)
    rewards, b, beta = [0.9, -0.4], 0.1, 0.3
    kls = _kl_by_hand(lm, w, prompts, responses)
    assert min(kls) > 1e-4  # the adapter really is away from the base
    lps = mean_logps(lm, w, prompts, responses)
    (upd,) = reinforce_step(lm, [batch(w, prompts, responses, rewards, b)], config(kl_coef=beta))
    kl_atol = float32_sum_atol(lm, kl_scale(lm, upd.kl))
    assert upd.kl == pytest.approx(sum(kls) / 2, abs=kl_atol, rel=0)
    terms = [(r - b) * lp for r, lp in zip(rewards, lps, strict=True)]
    pg, pg_atol = -sum(terms) / 2, float32_sum_atol(lm, sum(map(abs, terms)) / 2)
    assert upd.loss == pytest.approx(pg + beta * sum(kls) / 2, abs=pg_atol + beta * kl_atol)


@needs_kl
def test_kl_alone_pulls_the_adapter_toward_the_base(lm, data) -> None:
    prompts, responses = data
    w = random_weights(lm.bank, 14, scale=0.1)
    before = sum(_kl_by_hand(lm, w, prompts, responses))
    user = batch(w, prompts, responses, [0.2, 0.2], baseline=0.2)  # advantage 0: only KL
    (upd,) = reinforce_step(lm, [user], ReinforceConfig(kl_coef=1.0, learning_rate=1e-3))
    assert upd.grad_norm > 0
    after = sum(_kl_by_hand(lm, upd.weights, prompts, responses))
    assert after < before


@needs_kl
def test_kl_batched_users_equal_separate_steps(lm64, data) -> None:
    lm = lm64  # the same math in another summation order: float64, see tests/tolerances.py
    prompts, responses = data
    wa, wb = random_weights(lm.bank, 15), random_weights(lm.bank, 16)
    cfg = ReinforceConfig(kl_coef=0.2)
    users = [
        batch(wa, prompts, responses, [1.0, 0.0]),
        batch(wb, prompts[:1], responses[:1], [-1.0]),
    ]
    # advantages: leave-one-out for a (1 - 0 and 0 - 1), the running baseline 0 for b
    scales = [pg_scale(lm, users[0], [1.0, -1.0]), pg_scale(lm, users[1], [-1.0])]
    (ua,) = reinforce_step(lm, [users[0]], cfg)
    (ub,) = reinforce_step(lm, [users[1]], cfg)
    ua2, ub2 = reinforce_step(
        lm,
        [batch(wa, prompts, responses, [1.0, 0.0]), batch(wb, prompts[:1], responses[:1], [-1.0])],
        cfg,
    )
    for k, (one, two) in enumerate(((ua, ua2), (ub, ub2))):
        atol = adam_atol(grad_atol(lm, one.grad_norm), cfg.learning_rate, cfg.adam_eps, steps=1)
        assert_weights_close(one.weights, two.weights, atol=atol)
        kl_atol = float32_sum_atol(lm, kl_scale(lm, one.kl))
        assert one.kl == pytest.approx(two.kl, abs=kl_atol, rel=0)
        loss_atol = float32_sum_atol(lm, scales[k]) + cfg.kl_coef * kl_atol
        assert one.loss == pytest.approx(two.loss, abs=loss_atol, rel=0)


def test_leave_one_out_baseline_by_hand(lm, data) -> None:
    """With several samples, each sample's baseline is the mean of the user's others."""
    prompts, responses = data
    w = random_weights(lm.bank, 11)
    rewards = [1.0, -1.0]
    (upd,) = reinforce_step(
        lm, [batch(w, prompts, responses, rewards, baseline=5.0)], config(loo_baseline=True)
    )
    # advantages: 1 - (-1) = 2 and -1 - 1 = -2; the running baseline (5.0) is not used
    assert upd.mean_advantage == pytest.approx(0.0)
    with torch.no_grad():
        lm.bank.load(1, w)
        logps = response_logprobs(lm.model, lm.bank, prompts, responses, [1, 1])
    expected = -(2.0 * float(logps[0].mean()) - 2.0 * float(logps[1].mean())) / 2
    assert upd.loss == pytest.approx(expected, rel=1e-5, abs=1e-6)


def test_truncated_importance_ratio_by_hand(lm, data) -> None:
    """rho_t = min(c, pi_T / mu): a behaviour policy that gave the tokens half the current
    probability doubles each token's weight, and truncation caps it at c."""
    prompts, responses = data
    w = random_weights(lm.bank, 12)
    with torch.no_grad():
        lm.bank.load(1, w)
        logps = response_logprobs(lm.model, lm.bank, prompts[:1], responses[:1], [1])
    current = [float(v) for v in logps[0]]
    halved = [v - math.log(2.0) for v in current]
    losses = {}
    for c in (1.5, 4.0):
        user = batch(w, prompts[:1], responses[:1], [1.0])
        user.behaviour, user.temperatures = [halved], [1.0]
        (upd,) = reinforce_step(lm, [user], config(is_truncation=c))
        losses[c] = upd.loss
    on_policy = -(1.0 * float(logps[0].mean()))
    assert losses[4.0] == pytest.approx(2.0 * on_policy, rel=1e-4)
    assert losses[1.5] == pytest.approx(1.5 * on_policy, rel=1e-4)


def test_importance_ratio_uses_the_distribution_the_server_sampled(lm, data) -> None:
    """With top_p < 1 the server samples from the temperature-scaled policy truncated to
    its nucleus and renormalised, and logs those log-probs. Behaviour logged from the
    current adapter that way is on-policy: every ratio is 1, so the loss is the on-policy
    loss. Without the top-p (temperature only) the same logs read as off-policy."""
    prompts, _ = data
    w = random_weights(lm.bank, 13)
    temperature, top_p = 0.8, 0.6
    with torch.no_grad():
        lm.bank.load(1, w)
        # a response of the policy's most likely tokens: inside any nucleus, by construction
        response: list[int] = []
        for _ in range(6):
            probe = [*response, 0]
            (d,) = response_distributions(lm.model, lm.bank, prompts[:1], [probe], [1])
            response.append(int(d[-1].argmax()))
        (dist,) = response_distributions(lm.model, lm.bank, prompts[:1], [response], [1])
        logps = response_logprobs(lm.model, lm.bank, prompts[:1], [response], [1])
    responses = [response]
    tokens = torch.tensor(response)
    nucleus = nucleus_log_softmax(dist / temperature, torch.full(dist.shape[:-1], top_p))
    assert bool(torch.isinf(nucleus).any()), "top_p dropped no token: the test means nothing"
    logged = [float(v) for v in nucleus.gather(-1, tokens[:, None]).squeeze(-1)]
    on_policy = -(1.0 * float(logps[0].mean()))
    losses = {}
    for name, top_ps in (("matched", [top_p]), ("temperature only", None)):
        user = batch(w, prompts[:1], responses[:1], [1.0])
        user.behaviour, user.temperatures, user.top_ps = [logged], [temperature], top_ps
        (upd,) = reinforce_step(lm, [user], config(is_truncation=4.0))
        losses[name] = upd.loss
    assert losses["matched"] == pytest.approx(on_policy, rel=1e-4)
    assert losses["temperature only"] < on_policy * (1 - 1e-3)  # ratios < 1: biased low
