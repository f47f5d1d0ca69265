"""PEFT's on-disk adapter format, the only format adapters are stored in.

`adapter_config.json` comes from peft's own `LoraConfig`; weights are the keys peft saves
(`base_model.model.<module>.lora_A.weight`), so any stored version loads with
`PeftModel.from_pretrained` and any peft LoRA adapter loads here.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load, save

from loraloop.core.adapters.version import ADAPTER_CONFIG, ADAPTER_WEIGHTS, expected_checksum
from loraloop.core.multi_lora import LoRAWeights

_PREFIX = "base_model.model."


def to_peft_files(weights: LoRAWeights, base_model: str, targets: list[str]) -> dict[str, bytes]:
    """The two files of a PEFT adapter directory, as bytes. Tensors on another device (a
    GPU) are copied to the host first: safetensors writes host memory."""
    from peft import LoraConfig

    config = LoraConfig(
        r=weights.rank,
        lora_alpha=weights.alpha,  # type: ignore[arg-type]  # peft says int; floats work
        target_modules=sorted(targets),
        lora_dropout=0.0,
        bias="none",
        task_type="CAUSAL_LM",
        base_model_name_or_path=base_model,
        inference_mode=True,
    ).to_dict()
    config = {k: sorted(v) if isinstance(v, set) else v for k, v in config.items()}
    tensors: dict[str, torch.Tensor] = {}
    for name in weights.a:
        tensors[f"{_PREFIX}{name}.lora_A.weight"] = weights.a[name].detach().cpu().contiguous()
        tensors[f"{_PREFIX}{name}.lora_B.weight"] = weights.b[name].detach().cpu().contiguous()
    return {
        ADAPTER_CONFIG: json.dumps(config, indent=2, sort_keys=True, default=str).encode(),
        ADAPTER_WEIGHTS: save(tensors, metadata={"format": "pt"}),
    }


def read_peft_dir(path: Path) -> LoRAWeights:
    """Load a PEFT LoRA adapter directory; raises ValueError on anything malformed,
    including weights that no longer match the checksum the store recorded with them."""
    try:
        config = json.loads((path / ADAPTER_CONFIG).read_text())
        data = (path / ADAPTER_WEIGHTS).read_bytes()
        expected = expected_checksum(path)
        if expected is not None and hashlib.sha256(data).hexdigest() != expected:
            raise ValueError(
                f"{ADAPTER_WEIGHTS} does not match its recorded SHA-256: the file is corrupt"
            )
        tensors = load(data)
    except (OSError, ValueError, SafetensorError) as exc:
        raise ValueError(f"unreadable adapter in {path}: {exc}") from exc
    if not isinstance(config, dict) or config.get("peft_type") != "LORA":
        peft_type = config.get("peft_type") if isinstance(config, dict) else None
        raise ValueError(f"{path}: peft_type {peft_type!r} is not LORA")
    try:
        rank, alpha = int(config["r"]), float(config["lora_alpha"])
    except (KeyError, TypeError, ValueError) as exc:
        raise ValueError(f"{path}: {ADAPTER_CONFIG} needs numeric r and lora_alpha") from exc
    if rank < 1:
        raise ValueError(f"{path}: r={rank} must be >= 1")
    if config.get("use_rslora"):
        alpha = alpha * rank**0.5  # rsLoRA scales by alpha/sqrt(r): same product
    weights = LoRAWeights(rank=rank, alpha=alpha)
    for key, tensor in tensors.items():
        if not key.startswith(_PREFIX) or not key.endswith(".weight"):
            raise ValueError(f"{path}: unexpected tensor {key!r} in {ADAPTER_WEIGHTS}")
        # peft names the adapter inside keys when saving several: "...lora_A.default.weight"
        module, kind = key[len(_PREFIX) : -len(".weight")].removesuffix(".default").rsplit(".", 1)
        if kind == "lora_A":
            weights.a[module] = tensor
        elif kind == "lora_B":
            weights.b[module] = tensor
        else:
            raise ValueError(f"{path}: unsupported tensor {key!r} (only lora_A/lora_B)")
    if weights.a.keys() != weights.b.keys():
        raise ValueError(f"{path}: lora_A and lora_B name different modules")
    for name, a in weights.a.items():
        if a.shape[0] != rank or weights.b[name].shape[1] != rank:
            raise ValueError(f"{path}: {name} has shapes inconsistent with r={rank}")
    return weights
