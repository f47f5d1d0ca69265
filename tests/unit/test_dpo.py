"""Online DPO step on the tiny Llama: the loss against a float64 hand computation, log 2 at
the base model, batched == per pair and per user (float64, up to rounding), the direction
of the update, and the 'both' combination with REINFORCE's loss."""

from __future__ import annotations

import copy
import math
from collections.abc import Iterator

import pytest
import torch

from loraloop.core.logprobs import response_logprobs
from loraloop.core.model_loading import LoadedModel, load_model
from loraloop.core.multi_lora import LoRAWeights
from loraloop.core.settings import Settings
from loraloop.learner.algos.dpo import (
    DPOConfig,
    PairBatch,
    dpo_loss,
    pair_losses,
    preference_step,
)
from loraloop.learner.algos.reinforce import AdamState, ReinforceConfig, UserBatch, reinforce_step
from loraloop.learner.user_models import initial_weights
from tests.tolerances import adam_atol, float64_model, rounding_atol
from tests.unit.test_reinforce import (
    assert_weights_close,
    encode,
    float32_sum_atol,
    grad_atol,
    random_weights,
)

SLOTS = 4
BETA = 0.5


@pytest.fixture(scope="module")
def lm(tmp_path_factory: pytest.TempPathFactory) -> LoadedModel:
    return load_model(Settings(adapter_store=tmp_path_factory.mktemp("store")), slots=SLOTS)


@pytest.fixture(scope="module")
def lm64(tmp_path_factory: pytest.TempPathFactory) -> LoadedModel:
    """float64 model and bank: checks that two paths compute the same thing (tolerances.py)."""
    settings = Settings(adapter_store=tmp_path_factory.mktemp("store64"))
    return float64_model(load_model(settings, slots=SLOTS))


@pytest.fixture(autouse=True)
def _clean_bank(lm: LoadedModel, lm64: LoadedModel) -> Iterator[None]:
    yield
    for m in (lm, lm64):
        m.bank.set_rows(None)
        for slot in range(1, SLOTS):
            m.bank.clear(slot)


def pairs_of(lm: LoadedModel) -> PairBatch:
    """Two pairs: a formal reply preferred over a friendly one, and the reverse."""
    p1 = encode(lm, "user: How do I cook rice?\nassistant:")
    p2 = encode(lm, "user: What should I pack for Tokyo?\nassistant:")
    formal = encode(lm, " Certainly. Rinse it, then simmer it for twenty minutes.")[1:]
    friendly = encode(lm, " Sure thing! Rinse it and simmer it!")[1:]
    light = encode(lm, " Pack light shoes.")[1:]
    heavy = encode(lm, " Regarding Tokyo, one should pack an umbrella and good shoes.")[1:]
    return PairBatch([p1, p2], [formal, light], [friendly, heavy])


def sequence_logp(lm: LoadedModel, w: LoRAWeights | None, prompt, response) -> float:
    """log p(response | prompt), summed over tokens, with `w` (None: the base model)."""
    slot = 0
    if w is not None:
        lm.bank.load(1, w)
        slot = 1
    with torch.no_grad():
        (lp,) = response_logprobs(lm.model, lm.bank, [prompt], [response], [slot])
    return float(lp.sum())


def user(w: LoRAWeights, batch: UserBatch | None = None) -> UserBatch:
    """A user with no REINFORCE samples (the preference path alone), or `batch`'s."""
    if batch is not None:
        return batch
    return UserBatch(copy.deepcopy(w), AdamState(), 0.0, [], [], [])


RL = ReinforceConfig(kl_coef=0.0, loo_baseline=False, learning_rate=2e-3, max_grad_norm=0.5)


def test_loss_matches_a_float64_hand_computation(lm64: LoadedModel) -> None:
    lm = lm64
    w = random_weights(lm.bank, 11, scale=0.2)
    pairs = pairs_of(lm)
    lm.bank.load(1, w)
    with torch.no_grad():
        got = pair_losses(lm, [pairs], [1], DPOConfig(beta=BETA))
    terms = []
    scale = 0.0
    for prompt, chosen, rejected in zip(pairs.prompts, pairs.chosen, pairs.rejected, strict=True):
        s_c, s_r = sequence_logp(lm, w, prompt, chosen), sequence_logp(lm, w, prompt, rejected)
        r_c, r_r = (
            sequence_logp(lm, None, prompt, chosen),
            sequence_logp(lm, None, prompt, rejected),
        )
        margin = BETA * ((s_c - r_c) - (s_r - r_r))
        terms.append(math.log1p(math.exp(-margin)))  # -log sigmoid(m)
        scale += BETA * (abs(s_c) + abs(r_c) + abs(s_r) + abs(r_r))
    expected = sum(terms) / len(terms)
    assert abs(margin) > 1e-3  # the adapter is far enough from the base to test the formula
    assert got.pairs == [2]
    assert float(got.losses[0]) == pytest.approx(expected, abs=float32_sum_atol(lm, scale), rel=0)
    assert got.mean_loss[0] == pytest.approx(float(got.losses[0]))
    assert got.kl[0] > 0


def test_dpo_loss_formula_in_float64() -> None:
    pc, pr, rc, rr = (torch.tensor(v, dtype=torch.float64) for v in (-3.0, -5.0, -4.0, -4.5))
    m = 0.1 * ((-3.0 + 4.0) - (-5.0 + 4.5))
    eps = torch.finfo(torch.float64).eps
    assert float(dpo_loss(pc, pr, rc, rr, 0.1)) == pytest.approx(math.log1p(math.exp(-m)), abs=eps)


def test_a_new_adapter_is_the_reference_so_the_loss_is_log_2(lm: LoadedModel) -> None:
    w0 = initial_weights(lm.bank, "alice", seed=0)  # B = 0: exactly the base model
    lm.bank.load(1, w0)
    with torch.no_grad():
        got = pair_losses(lm, [pairs_of(lm)], [1], DPOConfig(beta=BETA))
    assert float(got.losses[0]) == pytest.approx(math.log(2), abs=1e-6)
    assert got.kl[0] == pytest.approx(0.0, abs=1e-6)


def test_batched_pairs_equal_each_pair_alone(lm64: LoadedModel) -> None:
    """Every pair's loss in one batch of two users equals its loss computed alone."""
    lm = lm64
    wa, wb = random_weights(lm.bank, 3, scale=0.2), random_weights(lm.bank, 4, scale=0.2)
    a, b = pairs_of(lm), pairs_of(lm)
    b = PairBatch(b.prompts[:1], b.rejected[:1], b.chosen[:1])  # the other way round
    lm.bank.load(1, wa)
    lm.bank.load(2, wb)
    cfg = DPOConfig(beta=BETA)
    with torch.no_grad():
        both = pair_losses(lm, [a, b], [1, 2], cfg)
        alone = []
        for slot, batch in ((1, a), (2, b)):
            singles = [
                pair_losses(lm, [PairBatch([p], [c], [r])], [slot], cfg).losses[0]
                for p, c, r in zip(batch.prompts, batch.chosen, batch.rejected, strict=True)
            ]
            alone.append(float(sum(singles)) / len(singles))
    atol = float32_sum_atol(lm, 200.0)  # sequence log-probs of these replies are < 50 each
    assert float(both.losses[0]) == pytest.approx(alone[0], abs=atol, rel=0)
    assert float(both.losses[1]) == pytest.approx(alone[1], abs=atol, rel=0)
    assert both.pairs == [2, 1]


def test_batched_users_step_equals_separate_steps(lm64: LoadedModel) -> None:
    lm = lm64
    wa, wb = random_weights(lm.bank, 5), random_weights(lm.bank, 6)
    a, b = pairs_of(lm), pairs_of(lm)
    b = PairBatch(b.prompts, b.rejected, b.chosen)
    cfg = DPOConfig(beta=BETA)
    (ua,) = preference_step(lm, [user(wa)], [a], RL, cfg)
    (ub,) = preference_step(lm, [user(wb)], [b], RL, cfg)
    ua2, ub2 = preference_step(lm, [user(wa), user(wb)], [a, b], RL, cfg)
    for one, two in ((ua, ua2), (ub, ub2)):
        atol = adam_atol(grad_atol(lm, one.grad_norm), RL.learning_rate, RL.adam_eps, steps=1)
        assert_weights_close(one.weights, two.weights, atol=atol)
        assert one.preference_loss == pytest.approx(two.preference_loss, abs=1e-9)
        assert one.pairs == two.pairs == 2


def test_step_raises_chosen_over_rejected_and_leaves_others_alone(lm: LoadedModel) -> None:
    w = initial_weights(lm.bank, "alice", seed=0)
    other = random_weights(lm.bank, 9)
    pairs = pairs_of(lm)

    def margins(weights: LoRAWeights) -> list[float]:
        return [
            sequence_logp(lm, weights, p, c) - sequence_logp(lm, weights, p, r)
            for p, c, r in zip(pairs.prompts, pairs.chosen, pairs.rejected, strict=True)
        ]

    before = margins(w)
    # the other user is in the step with neither samples nor pairs: a zero loss
    upd, upd_other = preference_step(
        lm, [user(w), user(other)], [pairs, PairBatch()], RL, DPOConfig(beta=BETA)
    )
    after = margins(upd.weights)
    assert all(x > y for x, y in zip(after, before, strict=True)), (before, after)
    assert upd.pairs == 2 and upd.preference_accuracy == 0.0  # margins were 0 before
    assert upd_other.pairs == 0 and upd_other.grad_norm == 0.0
    assert_weights_close(upd_other.weights, other, atol=0.0)


def test_both_adds_the_weighted_dpo_loss_to_reinforce(lm: LoadedModel) -> None:
    w = random_weights(lm.bank, 7)
    pairs = pairs_of(lm)
    prompts, responses = pairs.prompts[:1], pairs.chosen[:1]
    rl = UserBatch(copy.deepcopy(w), AdamState(), 0.0, prompts, responses, [0.8])
    (reinforce_only,) = reinforce_step(lm, [copy.deepcopy(rl)], RL)
    weight = 0.3
    (both,) = preference_step(
        lm, [copy.deepcopy(rl)], [pairs], RL, DPOConfig(beta=BETA, weight=weight)
    )
    scale = abs(reinforce_only.loss) + weight * both.preference_loss
    atol = rounding_atol(torch.float32, scale + 100.0, lm.model.config.vocab_size)
    expected = reinforce_only.loss + weight * both.preference_loss
    assert both.loss == pytest.approx(expected, abs=atol, rel=0)
    assert both.mean_reward == pytest.approx(0.8)
    assert both.kl == reinforce_only.kl  # a rewarded user reports REINFORCE's KL


def test_weight_is_one_unless_both() -> None:
    s = Settings(preference_learning="preference", dpo_weight=0.2)
    assert DPOConfig.from_settings(s).weight == 1.0
    s = Settings(preference_learning="both", dpo_weight=0.2)
    assert DPOConfig.from_settings(s).weight == 0.2
