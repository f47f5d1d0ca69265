"""sample_tokens: greedy, nucleus (top-p) and temperature sampling, and the log-probs it
reports (those of the distribution actually sampled from)."""

from __future__ import annotations

import math

import pytest
import torch

from loraloop.service.engines.hf import sample_tokens

V = 6
BASE_PROBS = torch.tensor([0.05, 0.4, 0.1, 0.25, 0.15, 0.05])


def _logits(rows: int = 1, shift: float = 3.0) -> torch.Tensor:
    # arbitrary offset: logits are only defined up to a constant
    return (BASE_PROBS.log() + shift).repeat(rows, 1)


def _kept_distribution(logits: torch.Tensor, t: float, top_p: float) -> torch.Tensor:
    """softmax(logits/t), restricted to the smallest top-p prefix and renormalised."""
    p = (logits.double() / t).softmax(-1)
    sp, order = p.sort(descending=True)
    keep = (sp.cumsum(-1) - sp) < top_p
    out = torch.zeros_like(p)
    out[order[keep]] = sp[keep]
    return out / out.sum()


def _draw(logits_row: torch.Tensor, t: float, top_p: float, n: int, seed: int):
    gen = torch.Generator().manual_seed(seed)
    logits = logits_row.repeat(n, 1)
    tokens, logprobs = sample_tokens(
        logits, torch.full((n,), t), torch.full((n,), top_p), [gen] * n
    )
    return tokens, logprobs


def test_greedy_rows_pick_argmax_and_report_model_logprob() -> None:
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(5, 50, generator=gen) * 3
    temperature = torch.zeros(5)
    top_p = torch.tensor([1.0, 0.5, 0.01, 0.9, 1.0])  # top_p does not matter when greedy
    tokens, logprobs = sample_tokens(logits, temperature, top_p, [None] * 5)
    assert torch.equal(tokens, logits.argmax(-1))
    expected = logits.log_softmax(-1).gather(-1, tokens[:, None]).squeeze(-1)
    assert torch.allclose(logprobs, expected, atol=1e-6)
    assert (logprobs < 0).all()  # the model's own distribution, not a point mass


def test_greedy_ignores_the_generator_state() -> None:
    logits = _logits(2)
    g = torch.Generator().manual_seed(1)
    before = g.get_state()
    sample_tokens(logits, torch.zeros(2), torch.ones(2), [g, g])
    assert torch.equal(g.get_state(), before)


def test_tiny_top_p_always_takes_the_top_token_with_logprob_zero() -> None:
    for t in (0.5, 1.0, 3.0):
        tokens, logprobs = _draw(_logits()[0], t, 1e-6, 300, seed=7)
        assert (tokens == 1).all()
        assert torch.equal(logprobs, torch.zeros(300))


def test_seeded_generators_are_reproducible() -> None:
    logits = torch.zeros(4, 100)  # uniform: every draw is up to chance
    t, p = torch.ones(4), torch.ones(4)

    def run(seeds):
        gens = [torch.Generator().manual_seed(s) for s in seeds]
        return torch.stack([sample_tokens(logits, t, p, gens)[0] for _ in range(30)])

    a, b = run([1, 2, 3, 4]), run([1, 2, 3, 4])
    assert torch.equal(a, b)
    # each row follows its own generator only
    c = run([1, 99, 3, 98])
    assert torch.equal(a[:, 0], c[:, 0]) and torch.equal(a[:, 2], c[:, 2])
    assert not torch.equal(a[:, 1], c[:, 1])
    assert not torch.equal(a[:, 0], a[:, 2])  # different seeds give different streams


def _chi_square(tokens: torch.Tensor, probs: torch.Tensor) -> float:
    n = tokens.numel()
    counts = torch.bincount(tokens, minlength=probs.numel()).double()
    support = probs > 0
    assert counts[~support].sum() == 0, "sampled a token outside the distribution"
    expected = probs[support] * n
    return float(((counts[support] - expected) ** 2 / expected).sum())


# chi-square 0.999 quantiles by degrees of freedom
_CHI2_999 = {1: 10.83, 2: 13.82, 3: 16.27, 4: 18.47, 5: 20.52}


@pytest.mark.parametrize("t", [1.0, 0.5, 2.0])
def test_frequencies_match_tempered_softmax(t: float) -> None:
    row = _logits()[0]
    tokens, _ = _draw(row, t, 1.0, 20_000, seed=123)
    probs = (row.double() / t).softmax(-1)
    chi2 = _chi_square(tokens, probs)
    assert chi2 < _CHI2_999[V - 1], chi2
    # and the temperature visibly matters: 0.5 sharpens, 2.0 flattens
    top_share = float((tokens == 1).double().mean())
    assert top_share == pytest.approx(float(probs[1]), abs=0.015)


def test_temperature_changes_the_distribution() -> None:
    row = _logits()[0]
    sharp, _ = _draw(row, 0.25, 1.0, 4000, seed=5)
    flat, _ = _draw(row, 4.0, 1.0, 4000, seed=5)
    assert (sharp == 1).double().mean() > 0.75
    assert (flat == 1).double().mean() < 0.35


@pytest.mark.parametrize(("t", "top_p"), [(1.0, 0.7), (1.0, 0.5), (0.8, 0.9), (1.5, 0.6)])
def test_top_p_frequencies_and_logprobs_use_the_renormalised_nucleus(
    t: float, top_p: float
) -> None:
    row = _logits()[0]
    tokens, logprobs = _draw(row, t, top_p, 20_000, seed=11)
    kept = _kept_distribution(row, t, top_p)
    support = int((kept > 0).sum())
    assert 1 < support < V  # the cases really cut the tail
    chi2 = _chi_square(tokens, kept)
    assert chi2 < _CHI2_999[support - 1], chi2
    expected = kept.log()[tokens].float()
    assert torch.allclose(logprobs, expected, atol=1e-5)


def test_top_p_hand_example() -> None:
    # probs 0.4, 0.25, 0.15, ...: with top_p=0.6 the nucleus is {1, 3} (0.4 < 0.6 <= 0.65)
    tokens, logprobs = _draw(_logits()[0], 1.0, 0.6, 2000, seed=3)
    assert set(tokens.tolist()) == {1, 3}
    lp = dict(zip(tokens.tolist(), logprobs.tolist(), strict=True))
    assert lp[1] == pytest.approx(math.log(0.4 / 0.65), abs=1e-5)
    assert lp[3] == pytest.approx(math.log(0.25 / 0.65), abs=1e-5)


def test_full_top_p_logprob_is_tempered_log_softmax() -> None:
    row = _logits()[0]
    tokens, logprobs = _draw(row, 0.7, 1.0, 500, seed=2)
    expected = (row / 0.7).log_softmax(-1)[tokens]
    assert torch.allclose(logprobs, expected, atol=1e-5)


def test_mixed_batch_rows_are_independent() -> None:
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 30, generator=gen)
    temperature = torch.tensor([0.0, 1.0, 1.0])
    top_p = torch.tensor([1.0, 1e-6, 1.0])
    g2 = torch.Generator().manual_seed(42)
    tokens, logprobs = sample_tokens(logits, temperature, top_p, [None, None, g2])
    assert tokens[0] == logits[0].argmax()
    assert tokens[1] == logits[1].argmax() and logprobs[1] == 0.0
    # row 2 gives what it gives when sampled alone with the same seed
    alone, alone_lp = sample_tokens(
        logits[2:], torch.ones(1), torch.ones(1), [torch.Generator().manual_seed(42)]
    )
    assert tokens[2] == alone[0]
    assert logprobs[2] == pytest.approx(float(alone_lp[0]), abs=1e-6)
    assert logprobs[2] == pytest.approx(float(logits[2].log_softmax(-1)[tokens[2]]), abs=1e-5)


def test_bfloat16_logits_are_accepted() -> None:
    row = _logits(1).bfloat16()
    tokens, logprobs = sample_tokens(row, torch.zeros(1), torch.ones(1), [None])
    assert tokens.dtype == torch.long and int(tokens[0]) == 1
    assert logprobs.dtype == torch.float32


def test_top_p_one_drops_nothing_even_when_the_float_sum_reaches_one_early() -> None:
    """float32 cumulative sums of a peaked row hit 1.0 before its tail; top_p 1 keeps it."""
    from loraloop.core.sampling import nucleus_log_softmax, outside_nucleus

    row = torch.tensor([[30.0, 0.0, -5.0, -10.0]])
    probs = row.softmax(-1)
    assert float(probs.cumsum(-1)[0, 0]) == 1.0  # the premise: the sum is 1 at once
    assert not outside_nucleus(probs, torch.ones(1)).any()
    assert torch.isfinite(nucleus_log_softmax(row, torch.ones(1))).all()


def test_the_draw_never_picks_a_zero_probability_token_and_follows_the_mass() -> None:
    """Inverse-transform draws over rows with masked (zero) tokens between kept ones, for
    unseeded rows in one batch and a seeded one."""
    from loraloop.service.engines.hf import draw

    probs = torch.tensor([[0.0, 0.5, 0.0, 0.25, 0.25, 0.0]] * 3)
    gens: list[torch.Generator | None] = [None, torch.Generator().manual_seed(3), None]
    picks = torch.stack([draw(probs, gens) for _ in range(6000)])
    for j in range(3):
        chi2 = _chi_square(picks[:, j], probs[j].double())
        assert chi2 < _CHI2_999[2], (j, chi2)
