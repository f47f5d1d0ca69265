"""Load a base causal LM and its tokenizer, frozen, with a multi-LoRA bank attached."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from loraloop.core.multi_lora import LoRABank
from loraloop.core.settings import Settings


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


class ModelNotConfiguredError(ValueError):
    """`Settings.model` names no model."""


def resolve_model_path(name: str) -> str:
    """Map a `Settings.model` value to what `from_pretrained` (or vLLM) loads: an existing
    local directory becomes its absolute path; anything else is a hub name, passed on as it
    is (it must be in the local Hugging Face cache when the hub cannot be reached)."""
    if not name.strip():
        raise ModelNotConfiguredError(
            "no base model: set LORALOOP_MODEL to a local Hugging Face model directory or a "
            "hub name in the local cache (`loraloop build-model` builds the demo's tiny model "
            "and prints its directory)"
        )
    path = Path(name).expanduser()
    return str(path.resolve()) if path.is_dir() else name


def load_model(settings: Settings, slots: int) -> LoadedModel:
    """Base model (a local HF directory or a cached hub name) with `slots` adapter slots on
    `settings.lora_targets`. Base weights never require grad."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = resolve_model_path(settings.model)
    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(path, dtype=_dtype(settings.dtype))
    model.eval()
    model.requires_grad_(False)
    bank = LoRABank(model, settings.lora_targets, slots, settings.lora_rank, settings.lora_alpha)
    return LoadedModel(model, tokenizer, bank, settings.model_id or settings.model, path)
