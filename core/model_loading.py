"""Load a base causal LM and its tokenizer, frozen, with a multi-LoRA bank attached."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from core.multi_lora import LoRABank
from core.settings import Settings


@dataclass
class LoadedModel:
    model: Any  # transformers PreTrainedModel
    tokenizer: Any  # transformers PreTrainedTokenizerBase
    bank: LoRABank
    model_id: str
    path: str


def _dtype(name: str) -> torch.dtype:
    value = getattr(torch, name, None)
    if not isinstance(value, torch.dtype):
        raise ValueError(f"dtype {name!r} is not a torch dtype: use float32 or bfloat16")
    return value


def load_model(settings: Settings, slots: int) -> LoadedModel:
    """Base model (any local HF directory, a cached hub name, or 'tiny') with `slots`
    adapter slots on `settings.lora_targets`. Base weights never require grad."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from core.tiny_model import resolve_model_path

    path = resolve_model_path(settings.model)
    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(path, dtype=_dtype(settings.dtype))
    model.eval()
    model.requires_grad_(False)
    bank = LoRABank(model, settings.lora_targets, slots, settings.lora_rank, settings.lora_alpha)
    return LoadedModel(model, tokenizer, bank, settings.model_id or settings.model, path)
