"""RunningBatch: rows that join and leave a running decode give the same tokens as each
row decoded alone, through their own adapters."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from loraloop.core.multi_lora import LoRABank, LoRAWeights
from loraloop.service.engines.batching import RunningBatch


@pytest.fixture(scope="module")
def model_and_bank() -> tuple[LlamaForCausalLM, LoRABank]:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=256,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        initializer_range=0.2,
    )
    model = LlamaForCausalLM(config).eval().requires_grad_(False)
    bank = LoRABank(model, ["q_proj", "v_proj"], 4, 4, 8.0)
    gen = torch.Generator().manual_seed(1)
    for slot in (1, 2, 3):
        w = LoRAWeights(4, 8.0)
        for name, layer in bank.layers.items():
            w.a[name] = torch.randn(4, layer.base.in_features, generator=gen) * 0.5
            w.b[name] = torch.randn(layer.base.out_features, 4, generator=gen) * 0.5
        bank.load(slot, w)
    return model, bank


def alone(model, bank, prompt: list[int], slot: int, n: int) -> list[int]:
    batch = RunningBatch(model, bank, pad_id=0)
    tok = batch.add([prompt], [slot]).argmax(-1)
    out = [int(tok)]
    for _ in range(n - 1):
        tok = batch.step(tok).argmax(-1)
        out.append(int(tok))
    return out


@torch.no_grad()
def test_rows_joining_and_leaving_match_solo_decoding(model_and_bank) -> None:
    model, bank = model_and_bank
    prompts = {0: [5, 6, 7], 1: [9, 10, 11, 12, 13, 14, 15], 2: [20], 3: [30, 31, 32, 33]}
    slots = {0: 1, 1: 2, 2: 0, 3: 3}
    lengths = {0: 6, 1: 12, 2: 9, 3: 5}
    joins = {0: [0, 1], 3: [2], 5: [3]}  # step -> rows that join then
    expected = {r: alone(model, bank, prompts[r], slots[r], lengths[r]) for r in prompts}

    batch = RunningBatch(model, bank, pad_id=0)
    rows: list[int] = []
    got: dict[int, list[int]] = {r: [] for r in prompts}
    step = 0
    while step < 40 and (rows or any(s >= step for s in joins)):
        if step in joins:
            new = joins[step]
            logits = batch.add([prompts[r] for r in new], [slots[r] for r in new])
            for r, t in zip(new, logits.argmax(-1).tolist(), strict=True):
                got[r].append(t)
            rows += new
        elif rows:
            logits = batch.step(torch.tensor([got[r][-1] for r in rows]))
            for r, t in zip(rows, logits.argmax(-1).tolist(), strict=True):
                got[r].append(t)
        keep = [i for i, r in enumerate(rows) if len(got[r]) < lengths[r]]
        batch.keep(keep)
        rows = [rows[i] for i in keep]
        assert len(batch) == len(rows)
        step += 1
    assert got == expected
    assert len(batch) == 0 and batch.cache is None
