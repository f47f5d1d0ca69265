"""Load a base causal LM and its tokenizer, frozen, with a multi-LoRA bank attached."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from loraloop.core.devices import resolve_device, resolve_dtype
from loraloop.core.multi_lora import LoRABank
from loraloop.core.settings import Settings, StartupError


@dataclass
class LoadedModel:
    model: Any  # transformers PreTrainedModel
    tokenizer: Any  # transformers PreTrainedTokenizerBase
    bank: LoRABank
    model_id: str
    path: str

    @property
    def device(self) -> torch.device:
        """Where the model, its LoRA bank and every tensor fed to them live."""
        return self.bank.device


class ModelNotConfiguredError(StartupError, ValueError):
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
    `settings.lora_targets`, on `settings.device` in `settings.dtype` (loraloop/core/devices.py:
    "auto" resolved). Base weights never require grad. A device this machine lacks raises
    DeviceUnavailableError before anything is loaded."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    device = resolve_device(settings.device)
    dtype = resolve_dtype(settings.dtype, device)
    path = resolve_model_path(settings.model)
    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    model: Any = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    model.to(device)  # before the bank: its A/B stacks are made where the base weights are
    model.eval()
    model.requires_grad_(False)
    bank = LoRABank(model, settings.lora_targets, slots, settings.lora_rank, settings.lora_alpha)
    return LoadedModel(model, tokenizer, bank, settings.model_id or settings.model, path)
