"""Per-token log-probabilities of responses under a model with per-row adapters.

The learner's policy gradient and the tests that check what an update did both use this,
so "the log-probability of a response" means one thing everywhere.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from loraloop.core.multi_lora import LoRABank

if TYPE_CHECKING:
    from transformers import PreTrainedModel


def response_distributions(
    model: PreTrainedModel,
    bank: LoRABank,
    prompts: list[list[int]],
    responses: list[list[int]],
    slots: list[int],
    pad_id: int = 0,
) -> list[torch.Tensor]:
    """Log-softmax over the vocabulary at every response position: `[len(response), V]`
    per row, each row through its own adapter slot.

    Rows are right-padded into one batch: one forward (and, under autograd, one backward)
    for all rows, whatever adapters they use. The batch is built on the host and copied to
    the bank's device once; the distributions are on that device.
    """
    if not (len(prompts) == len(responses) == len(slots)):
        raise ValueError("prompts, responses and slots must have the same length")
    lengths = [len(p) + len(r) for p, r in zip(prompts, responses, strict=True)]
    width = max(lengths)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, (p, r) in enumerate(zip(prompts, responses, strict=True)):
        ids[i, : lengths[i]] = torch.tensor(p + r, dtype=torch.long)
        mask[i, : lengths[i]] = 1
    starts = [len(p) - 1 for p in prompts]
    sizes = [len(r) for r in responses]
    rows = torch.cat([torch.full((n,), i, dtype=torch.long) for i, n in enumerate(sizes)])
    cols = torch.cat([torch.arange(s, s + n) for s, n in zip(starts, sizes, strict=True)])
    device = bank.device
    ids, mask, rows, cols = (t.to(device) for t in (ids, mask, rows, cols))
    with bank.rows(slots):
        if _head_on_hidden_states(model):
            # Only response positions need the vocabulary projection: project those alone.
            hidden = model.get_decoder()(input_ids=ids, attention_mask=mask).last_hidden_state
            logits = model.get_output_embeddings()(hidden[rows, cols])
        else:
            logits = model(input_ids=ids, attention_mask=mask).logits[rows, cols]
    # At least float32 (bf16 logits are promoted), and float64 stays float64.
    wide = logits.to(torch.promote_types(logits.dtype, torch.float32))
    return list(wide.log_softmax(-1).split(sizes))


def _head_on_hidden_states(model: PreTrainedModel) -> bool:
    """True when logits are just the output embedding applied to the decoder's hidden
    states (Llama, Qwen, Mistral...), not rescaled or soft-capped afterwards (Gemma...)."""
    config = getattr(model, "config", None)
    return (
        hasattr(model, "get_decoder")
        and hasattr(model, "get_output_embeddings")
        and model.get_output_embeddings() is not None
        and not getattr(config, "final_logit_softcapping", None)
        and not getattr(config, "logit_scale", None)
        and not hasattr(model, "logit_scale")
    )


def token_logprobs(
    distributions: list[torch.Tensor], responses: list[list[int]]
) -> list[torch.Tensor]:
    """Pick each response token's log-probability out of its position's distribution."""
    return [
        dist.gather(-1, torch.tensor(r, dtype=torch.long, device=dist.device)[:, None]).squeeze(-1)
        for dist, r in zip(distributions, responses, strict=True)
    ]


def response_logprobs(
    model: PreTrainedModel,
    bank: LoRABank,
    prompts: list[list[int]],
    responses: list[list[int]],
    slots: list[int],
    pad_id: int = 0,
) -> list[torch.Tensor]:
    """log p(response_t | prompt, response_<t) for every row, each through its own slot."""
    dists = response_distributions(model, bank, prompts, responses, slots, pad_id)
    return token_logprobs(dists, responses)
