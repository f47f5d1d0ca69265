"""PEFT on-disk format: round trip, and every malformed adapter is a ValueError."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load, save

from loraloop.core.adapters.peft_format import read_peft_dir, to_peft_files
from loraloop.core.adapters.store import AdapterStore
from loraloop.core.adapters.version import ADAPTER_CONFIG, ADAPTER_WEIGHTS
from loraloop.core.multi_lora import LoRAWeights

MODULES = [
    "model.layers.0.self_attn.q_proj",
    "model.layers.0.self_attn.v_proj",
    "model.layers.1.self_attn.q_proj",
    "model.layers.1.self_attn.v_proj",
]
TARGETS = ["v_proj", "q_proj"]


def _weights(rank: int = 4, alpha: float = 8.0, seed: int = 0) -> LoRAWeights:
    gen = torch.Generator().manual_seed(seed)
    w = LoRAWeights(rank=rank, alpha=alpha)
    for name in MODULES:
        w.a[name] = torch.randn(rank, 16, generator=gen)
        w.b[name] = torch.randn(24, rank, generator=gen)
    return w


def _write(path: Path, files: dict[str, bytes]) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        (path / name).write_bytes(data)
    return path


def test_round_trip(tmp_path: Path) -> None:
    w = _weights(rank=4, alpha=8.0)
    files = to_peft_files(w, "tiny-base", TARGETS)
    assert set(files) == {ADAPTER_CONFIG, ADAPTER_WEIGHTS}
    back = read_peft_dir(_write(tmp_path / "a", files))
    assert back.rank == 4 and back.alpha == 8.0 and back.scaling == 2.0
    assert set(back.a) == set(MODULES) == set(back.b)
    for name in MODULES:
        assert torch.equal(back.a[name], w.a[name])
        assert torch.equal(back.b[name], w.b[name])


def test_round_trip_through_the_store(tmp_path: Path) -> None:
    w = _weights(rank=2, alpha=3.0, seed=5)
    stored = AdapterStore(tmp_path).write("alice", 1, to_peft_files(w, "tiny", TARGETS))
    back = read_peft_dir(stored.path)
    assert back.rank == 2 and back.alpha == 3.0
    for name in MODULES:
        assert torch.equal(back.a[name], w.a[name]) and torch.equal(back.b[name], w.b[name])


def test_files_use_peft_keys_and_config(tmp_path: Path) -> None:
    w = _weights(rank=4, alpha=8.0)
    files = to_peft_files(w, "tiny-base", TARGETS)
    config = json.loads(files[ADAPTER_CONFIG])
    assert config["peft_type"] == "LORA"
    assert config["r"] == 4 and config["lora_alpha"] == 8.0
    assert config["target_modules"] == ["q_proj", "v_proj"]
    assert config["base_model_name_or_path"] == "tiny-base"
    assert config["lora_dropout"] == 0.0
    tensors = load(files[ADAPTER_WEIGHTS])
    assert set(tensors) == {
        f"base_model.model.{m}.lora_{ab}.weight" for m in MODULES for ab in ("A", "B")
    }
    # the config is one peft itself accepts
    from peft import LoraConfig

    cfg = LoraConfig.from_pretrained(str(_write(tmp_path / "a", files)))
    assert cfg.r == 4 and cfg.lora_alpha == 8.0
    assert set(cfg.target_modules) == {"q_proj", "v_proj"}


def test_rslora_alpha_is_folded(tmp_path: Path) -> None:
    w = _weights(rank=4, alpha=8.0)
    files = to_peft_files(w, "tiny", TARGETS)
    config = json.loads(files[ADAPTER_CONFIG])
    config["use_rslora"] = True
    files[ADAPTER_CONFIG] = json.dumps(config).encode()
    back = read_peft_dir(_write(tmp_path / "a", files))
    # rsLoRA scales by alpha / sqrt(r) = 8 / 2 = 4
    assert back.scaling == pytest.approx(4.0)


def test_peft_default_adapter_name_in_keys_is_accepted(tmp_path: Path) -> None:
    w = _weights()
    tensors = {}
    for name in MODULES:
        tensors[f"base_model.model.{name}.lora_A.default.weight"] = w.a[name]
        tensors[f"base_model.model.{name}.lora_B.default.weight"] = w.b[name]
    files = to_peft_files(w, "tiny", TARGETS)
    files[ADAPTER_WEIGHTS] = save(tensors)
    back = read_peft_dir(_write(tmp_path / "a", files))
    assert set(back.a) == set(MODULES)
    assert torch.equal(back.b[MODULES[2]], w.b[MODULES[2]])


# --- malformed adapters ------------------------------------------------------------------


def _good_files() -> dict[str, bytes]:
    return to_peft_files(_weights(), "tiny", TARGETS)


def _expect_value_error(tmp_path: Path, files: dict[str, bytes], match: str) -> None:
    path = _write(tmp_path / "bad", files)
    with pytest.raises(ValueError, match=match) as info:
        read_peft_dir(path)
    assert str(info.value)  # the message says something


def test_bad_json(tmp_path: Path) -> None:
    files = _good_files()
    files[ADAPTER_CONFIG] = b"{not json"
    _expect_value_error(tmp_path, files, "unreadable adapter")


def test_missing_files(tmp_path: Path) -> None:
    files = _good_files()
    del files[ADAPTER_WEIGHTS]
    _expect_value_error(tmp_path, files, "unreadable adapter")
    with pytest.raises(ValueError, match="unreadable adapter"):
        read_peft_dir(tmp_path / "does-not-exist")


def test_wrong_peft_type(tmp_path: Path) -> None:
    files = _good_files()
    config = json.loads(files[ADAPTER_CONFIG])
    config["peft_type"] = "PREFIX_TUNING"
    files[ADAPTER_CONFIG] = json.dumps(config).encode()
    _expect_value_error(tmp_path, files, "PREFIX_TUNING.*not LORA")


def test_stray_tensor_key(tmp_path: Path) -> None:
    files = _good_files()
    tensors = load(files[ADAPTER_WEIGHTS])
    tensors["model.embed_tokens.weight"] = torch.zeros(3, 3)
    files[ADAPTER_WEIGHTS] = save(tensors)
    _expect_value_error(tmp_path, files, "unexpected tensor")


def test_unsupported_lora_tensor_kind(tmp_path: Path) -> None:
    files = _good_files()
    tensors = load(files[ADAPTER_WEIGHTS])
    tensors[f"base_model.model.{MODULES[0]}.lora_magnitude_vector.weight"] = torch.zeros(24)
    files[ADAPTER_WEIGHTS] = save(tensors)
    _expect_value_error(tmp_path, files, "unsupported tensor")


def test_mismatched_a_and_b_modules(tmp_path: Path) -> None:
    files = _good_files()
    tensors = load(files[ADAPTER_WEIGHTS])
    del tensors[f"base_model.model.{MODULES[1]}.lora_B.weight"]
    files[ADAPTER_WEIGHTS] = save(tensors)
    _expect_value_error(tmp_path, files, "different modules")


def test_shapes_inconsistent_with_rank(tmp_path: Path) -> None:
    files = _good_files()
    config = json.loads(files[ADAPTER_CONFIG])
    config["r"] = 8  # tensors have rank 4
    files[ADAPTER_CONFIG] = json.dumps(config).encode()
    _expect_value_error(tmp_path, files, "inconsistent with r=8")


@pytest.mark.parametrize("keep", [0.5, 0.9])
def test_truncated_safetensors(tmp_path: Path, keep: float) -> None:
    files = _good_files()
    data = files[ADAPTER_WEIGHTS]
    files[ADAPTER_WEIGHTS] = data[: int(len(data) * keep)]
    _expect_value_error(tmp_path, files, "unreadable adapter")


def test_truncated_safetensors_is_refused_somehow(tmp_path: Path) -> None:
    """Whatever the exception type, a truncated file never loads as an adapter."""
    files = _good_files()
    files[ADAPTER_WEIGHTS] = files[ADAPTER_WEIGHTS][:-7]
    with pytest.raises(Exception, match=r"(?i)deserializ|unreadable"):
        read_peft_dir(_write(tmp_path / "bad", files))


def test_config_missing_rank(tmp_path: Path) -> None:
    files = _good_files()
    config = json.loads(files[ADAPTER_CONFIG])
    del config["r"]
    files[ADAPTER_CONFIG] = json.dumps(config).encode()
    _expect_value_error(tmp_path, files, "r")
