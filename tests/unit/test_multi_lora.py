"""Multi-LoRA bank on the tiny Llama: bit-for-bit the base model in slot 0; the same math
as peft, as rows alone and as per-row gradients (checked in float64, where only rounding
separates them: the sums run in other orders); rank padding."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from loraloop.core.adapters.peft_format import read_peft_dir, to_peft_files
from loraloop.core.adapters.store import AdapterStore
from loraloop.core.logprobs import response_logprobs
from loraloop.core.model_loading import LoadedModel, load_model
from loraloop.core.multi_lora import BASE_SLOT, LoRABank, LoRAWeights
from loraloop.core.settings import Settings
from tests.tolerances import as_dtype, backward_atol, float64_model, forward_atol

SLOTS = 4


@pytest.fixture(scope="module")
def lm(tmp_path_factory: pytest.TempPathFactory) -> LoadedModel:
    return load_model(Settings(adapter_store=tmp_path_factory.mktemp("store")), slots=SLOTS)


@pytest.fixture(scope="module")
def lm64(tmp_path_factory: pytest.TempPathFactory) -> LoadedModel:
    """The same model and bank in float64, for the checks that two paths compute the same
    thing: there they agree to ~1e-13, not just to float32's summation-order noise."""
    settings = Settings(adapter_store=tmp_path_factory.mktemp("store64"))
    return float64_model(load_model(settings, slots=SLOTS))


@pytest.fixture(scope="module")
def plain(model_dir: Path):
    return AutoModelForCausalLM.from_pretrained(model_dir).eval()


@pytest.fixture(autouse=True)
def _clean_bank(lm: LoadedModel, lm64: LoadedModel) -> Iterator[None]:
    yield
    for m in (lm, lm64):
        m.bank.set_rows(None)
        for slot in range(1, SLOTS):
            m.bank.clear(slot)
        for p in m.bank.parameters():
            p.requires_grad_(False)
            p.grad = None


def random_adapter(
    bank: LoRABank, rank: int, alpha: float, seed: int, modules: list[str] | None = None
) -> LoRAWeights:
    gen = torch.Generator().manual_seed(seed)
    w = LoRAWeights(rank, alpha)
    for name in modules or list(bank.layers):
        layer = bank.layers[name]
        w.a[name] = torch.randn(rank, layer.base.in_features, generator=gen) * 0.2
        w.b[name] = torch.randn(layer.base.out_features, rank, generator=gen) * 0.2
    return w


def ids(seed: int, rows: int, length: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(4, 2048, (rows, length), generator=gen)


def logits(
    lm: LoadedModel,
    input_ids: torch.Tensor,
    slots: list[int] | None,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    with torch.no_grad(), lm.bank.rows(slots):
        return lm.model(input_ids=input_ids, attention_mask=mask).logits


def peft_logits(model_dir: Path, adapter_dir: Path, input_ids: torch.Tensor) -> torch.Tensor:
    """peft's logits, base model and adapter in float64."""
    from peft import PeftModel

    base = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    model = PeftModel.from_pretrained(base, str(adapter_dir)).eval().to(torch.float64)
    assert all(p.dtype == torch.float64 for p in model.parameters())
    with torch.no_grad():
        return model(input_ids=input_ids).logits


def assert_same_logits(got: torch.Tensor, want: torch.Tensor, config) -> None:
    """Logits of two paths through the same math: equal up to rounding (`forward_atol`)."""
    assert got.dtype == want.dtype
    atol = forward_atol(config, want.dtype, float(want.abs().max()))
    torch.testing.assert_close(got, want, atol=atol, rtol=0)


def store_adapter(tmp_path: Path, w: LoRAWeights, lm: LoadedModel) -> Path:
    files = to_peft_files(w, lm.path, ["q_proj", "k_proj", "v_proj", "o_proj"])
    return AdapterStore(tmp_path / "store").write("alice", 1, files).path


def test_bank_wraps_every_target(lm: LoadedModel) -> None:
    assert len(lm.bank.layers) == lm.model.config.num_hidden_layers * 4  # q,k,v,o per layer
    assert lm.bank.rank == 8 and lm.bank.alpha == 16.0 and lm.bank.scaling == 2.0
    assert not any(p.requires_grad for p in lm.model.parameters())


def test_bank_without_targets_is_refused(model_dir: Path) -> None:
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    with pytest.raises(ValueError, match="lora_targets"):
        LoRABank(model, ["nope_proj"], 4, 8, 16.0)
    with pytest.raises(ValueError, match="2 slots"):
        LoRABank(model, ["q_proj"], 1, 8, 16.0)


def test_base_slot_equals_plain_model_exactly(lm: LoadedModel, plain) -> None:
    x = ids(0, 2, 12)
    # other slots hold adapters: slot 0 must not see them
    lm.bank.load(1, random_adapter(lm.bank, 8, 16.0, seed=1))
    with torch.no_grad():
        want = plain(input_ids=x).logits
    assert torch.equal(logits(lm, x, [BASE_SLOT, BASE_SLOT]), want)
    assert torch.equal(logits(lm, x, None), want)  # no rows selected: the base model


def test_adapter_matches_peft(
    lm: LoadedModel, lm64: LoadedModel, model_dir: Path, plain, tmp_path: Path
) -> None:
    w = random_adapter(lm.bank, 8, 16.0, seed=2)
    path = store_adapter(tmp_path, w, lm)
    x = ids(1, 2, 10)
    want = peft_logits(model_dir, path, x)
    lm64.bank.load(2, as_dtype(read_peft_dir(path), torch.float64))
    got = logits(lm64, x, [2, 2])
    with torch.no_grad():
        base = plain(input_ids=x).logits
    assert (want - base).abs().max() > 0.1  # the adapter really changes the output
    # same rank and alpha: the same math as peft, summed in another order (bmm vs Linear)
    assert_same_logits(got, want, lm64.model.config)


def test_lower_rank_adapter_matches_peft(
    lm: LoadedModel, lm64: LoadedModel, model_dir: Path, plain, tmp_path: Path
) -> None:
    w = random_adapter(lm.bank, 4, 5.0, seed=3)  # scaling 1.25 vs the bank's 2.0
    path = store_adapter(tmp_path, w, lm)
    x = ids(2, 1, 9)
    want = peft_logits(model_dir, path, x)
    # folding 1.25/2.0 into B rounds once per weight (in float64 here, like the rest)
    lm64.bank.load(1, as_dtype(read_peft_dir(path), torch.float64))
    assert_same_logits(logits(lm64, x, [1]), want, lm64.model.config)
    lm.bank.load(1, read_peft_dir(path))  # and the float32 bank stores what it should:
    with torch.no_grad():
        assert (want - plain(input_ids=x).logits).abs().max() > 0.05
    # the adapter's scaling is folded into B, the extra rank is zero padding
    back = lm.bank.read(1)
    name = next(iter(w.a))
    assert back.rank == 8 and back.alpha == 16.0
    assert torch.equal(back.a[name][:4], w.a[name])
    assert torch.equal(back.a[name][4:], torch.zeros_like(back.a[name][4:]))
    torch.testing.assert_close(back.b[name][:, :4], w.b[name] * (1.25 / 2.0))
    assert torch.equal(back.b[name][:, 4:], torch.zeros_like(back.b[name][:, 4:]))


def test_rank_above_bank_rank_is_refused(lm: LoadedModel) -> None:
    before = lm.bank.read(1)
    with pytest.raises(ValueError, match="lora_rank"):
        lm.bank.load(1, random_adapter(lm.bank, 16, 16.0, seed=4))
    after = lm.bank.read(1)
    for name in before.a:  # nothing was half-loaded
        assert torch.equal(before.a[name], after.a[name])
        assert torch.equal(before.b[name], after.b[name])


@pytest.mark.parametrize("slot", [0, SLOTS, -1])
def test_slot_out_of_range(lm: LoadedModel, slot: int) -> None:
    with pytest.raises(ValueError, match="out of range"):
        lm.bank.load(slot, random_adapter(lm.bank, 8, 16.0, seed=0))
    with pytest.raises(ValueError, match="out of range"):
        lm.bank.read(slot)


def test_read_round_trips_load(lm: LoadedModel) -> None:
    w = random_adapter(lm.bank, 8, 16.0, seed=5)
    lm.bank.load(3, w)
    back = lm.bank.read(3)
    assert (back.rank, back.alpha) == (8, 16.0)
    assert set(back.a) == set(w.a)
    for name in w.a:
        assert torch.equal(back.a[name], w.a[name])
        assert torch.equal(back.b[name], w.b[name])
    # read() returns a copy
    back.a[name].fill_(7.0)
    assert not torch.equal(lm.bank.read(3).a[name], back.a[name])


def test_partial_adapter_zeroes_the_other_modules(lm: LoadedModel) -> None:
    full = random_adapter(lm.bank, 8, 16.0, seed=6)
    lm.bank.load(1, full)
    only_q = [n for n in lm.bank.layers if n.endswith("q_proj")]
    lm.bank.load(1, random_adapter(lm.bank, 8, 16.0, seed=7, modules=only_q))
    back = lm.bank.read(1)
    for name in lm.bank.layers:
        if name not in only_q:
            assert not back.a[name].any() and not back.b[name].any()
        else:
            assert back.a[name].any()


def test_slots_are_isolated_and_clear_restores_base(lm: LoadedModel, plain) -> None:
    x = ids(3, 1, 8)
    lm.bank.load(1, random_adapter(lm.bank, 8, 16.0, seed=8))
    first = logits(lm, x, [1])
    lm.bank.load(2, random_adapter(lm.bank, 8, 16.0, seed=9))
    assert torch.equal(logits(lm, x, [1]), first)  # loading slot 2 left slot 1 alone
    assert not torch.allclose(logits(lm, x, [2]), first, atol=1e-3)
    lm.bank.clear(1)
    with torch.no_grad():
        assert torch.equal(logits(lm, x, [1]), plain(input_ids=x).logits)


def test_reload_invalidates_cached_gather(lm: LoadedModel) -> None:
    """Decode caches the gathered per-row A/B; a reload of the slot must not be shadowed."""
    x = ids(4, 1, 6)
    w1, w2 = random_adapter(lm.bank, 8, 16.0, seed=10), random_adapter(lm.bank, 8, 16.0, 11)
    lm.bank.load(1, w1)
    lm.bank.load(2, w2)
    want2 = logits(lm, x, [2])
    with torch.no_grad(), lm.bank.rows([1]):
        a = lm.model(input_ids=x).logits
        lm.bank.load(1, w2)  # same rows, same generation
        b = lm.model(input_ids=x).logits
    assert not torch.allclose(a, b, atol=1e-3)
    # the same rows and shapes through the same code: equal but for rounding, at most
    assert_same_logits(b, want2, lm.model.config)


def test_mixed_batch_equals_rows_alone(lm64: LoadedModel) -> None:
    lm = lm64  # the same math in another summation order: float64, see tests/tolerances.py
    lm.bank.load(1, as_dtype(random_adapter(lm.bank, 8, 16.0, seed=12), torch.float64))
    lm.bank.load(2, as_dtype(random_adapter(lm.bank, 4, 3.0, seed=13), torch.float64))
    lengths, slots = [7, 11, 9, 11], [0, 1, 2, 1]
    rows = [ids(20 + i, 1, n)[0] for i, n in enumerate(lengths)]
    width = max(lengths)
    batch = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for i, r in enumerate(rows):  # right padding
        batch[i, : len(r)] = r
        mask[i, : len(r)] = 1
    mixed = logits(lm, batch, slots, mask)
    for i, (r, s) in enumerate(zip(rows, slots, strict=True)):
        alone = logits(lm, r[None], [s])[0]
        assert_same_logits(mixed[i, : len(r)], alone, lm.model.config)
    # and the rows really differ by adapter: same tokens, different slots
    same = rows[1][None].repeat(3, 1)
    out = logits(lm, same, [0, 1, 2])
    assert (out[0] - out[1]).abs().max() > 0.05 and (out[1] - out[2]).abs().max() > 0.05


def test_mixed_batch_gradients_equal_per_row_gradients(lm64: LoadedModel) -> None:
    lm = lm64  # the same math in another summation order: float64, see tests/tolerances.py
    bank = lm.bank
    for slot in (1, 2, 3):
        bank.load(slot, random_adapter(bank, 8, 16.0, seed=30 + slot))
    prompts = [
        ids(40, 1, 5)[0].tolist(),
        ids(41, 1, 3)[0].tolist(),
        ids(42, 1, 6)[0].tolist(),
        ids(43, 1, 4)[0].tolist(),
    ]
    responses = [
        ids(50, 1, 4)[0].tolist(),
        ids(51, 1, 6)[0].tolist(),
        ids(52, 1, 2)[0].tolist(),
        ids(53, 1, 3)[0].tolist(),
    ]
    slots = [1, 2, 3, 2]  # slot 2 serves two rows
    weights = [0.7, -1.3, 0.4, 2.0]
    params = bank.parameters()

    def grads(rows: list[int]) -> list[torch.Tensor]:
        for p in params:
            p.requires_grad_(True)
            p.grad = None
        with torch.enable_grad():
            lps = response_logprobs(
                lm.model,
                bank,
                [prompts[i] for i in rows],
                [responses[i] for i in rows],
                [slots[i] for i in rows],
            )
            loss = sum(weights[i] * lp.sum() for i, lp in zip(rows, lps, strict=True))
            loss.backward()
        out = [p.grad.detach().clone() for p in params]
        for p in params:
            p.requires_grad_(False)
            p.grad = None
        return out

    batched = grads([0, 1, 2, 3])
    per_row = [grads([i]) for i in range(4)]
    for j, _ in enumerate(params):
        # slot 0 (the base) never gets a gradient
        assert not batched[j][0].any()
        for slot in (1, 2, 3):
            want = sum(per_row[i][j][slot] for i in range(4) if slots[i] == slot)
            atol = backward_atol(lm.model.config, want.dtype, float(want.abs().max()))
            torch.testing.assert_close(batched[j][slot], want, atol=atol, rtol=0)
            assert want.abs().max() > 0  # a real gradient (A and B are both non-zero)
        # a row alone touches only its own slot
        for i in range(4):
            for other in {1, 2, 3} - {slots[i]}:
                assert not per_row[i][j][other].any()
