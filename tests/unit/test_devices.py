"""`Settings.device` and `Settings.dtype`: resolved once (loraloop/core/devices.py), the model,
its LoRA bank, the hf engine's decode and sampling and the learner's step all on that device;
"cuda" on a machine without CUDA is refused at start-up. This machine has no GPU, so "auto"
is the CPU here; scripts/gpu-check.sh runs the same paths on CUDA."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from pydantic import ValidationError

from loraloop.core.devices import (
    DeviceUnavailableError,
    resolve_device,
    resolve_dtype,
    resolved_dtype_name,
)
from loraloop.core.model_loading import LoadedModel, load_model
from loraloop.core.multi_lora import LoRABank, LoRAWeights
from loraloop.core.settings import Settings
from loraloop.learner.algos.reinforce import AdamState, ReinforceConfig, UserBatch, reinforce_step
from loraloop.service.engines.hf import HFEngine
from loraloop.service.engines.protocol import GenerationRequest

NO_CUDA = not torch.cuda.is_available()
needs_no_cuda = pytest.mark.skipif(not NO_CUDA, reason="this machine has CUDA")


def test_device_and_dtype_resolution() -> None:
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type == ("cpu" if NO_CUDA else "cuda")
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert resolved_dtype_name("auto", cuda) == "bfloat16"  # GPUs serve in bf16
    assert resolved_dtype_name("auto", cpu) == "float32"
    assert resolve_dtype("float16", cpu) == torch.float16  # explicit values are kept
    assert resolve_dtype("auto", cpu) == torch.float32
    with pytest.raises(ValidationError, match="'auto', 'cpu' or 'cuda'"):
        Settings(device="gpu")
    with pytest.raises(ValidationError, match="'auto', 'float32', 'bfloat16' or 'float16'"):
        Settings(dtype="fp8")


@needs_no_cuda
def test_cuda_without_cuda_is_refused() -> None:
    with pytest.raises(DeviceUnavailableError, match="LORALOOP_DEVICE=cuda but CUDA is not"):
        resolve_device("cuda")
    with pytest.raises(DeviceUnavailableError):
        load_model(Settings(device="cuda"), slots=2)


@needs_no_cuda
@pytest.mark.parametrize("command", ["serve", "learn"])
def test_serve_and_learn_refuse_cuda_at_start_up(tmp_path: Path, command: str) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "loraloop.cli", command],
        env={
            "PATH": "/usr/bin:/bin",
            "HOME": str(tmp_path),
            "LORALOOP_MODEL": Settings().model,
            "LORALOOP_DEVICE": "cuda",
            "LORALOOP_PORT": "0",
            "LORALOOP_KAFKA_BOOTSTRAP": "127.0.0.1:1",  # never reached
        },
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2, proc.stderr
    assert f"loraloop {command}: LORALOOP_DEVICE=cuda but CUDA is not available" in proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize("device", ["cpu", "auto"])
def test_hf_engine_serves_on_the_device(tmp_path: Path, device: str) -> None:
    settings = Settings(device=device, adapter_store=tmp_path / "store", adapter_slots=2)
    engine = HFEngine(settings)

    async def run() -> list[list[int]]:
        await engine.start()
        try:
            prompt = engine.encode("How do I cook rice?", None)
            out = []
            for rid, (temperature, seed) in enumerate([(0.0, None), (1.0, 7), (1.0, 7)]):
                request = GenerationRequest(str(rid), prompt, None, 6, temperature, 0.9, seed)
                out.append(
                    [
                        t
                        for chunk in [c async for c in engine.stream(request)]
                        for t in chunk.token_ids
                    ]
                )
            return out
        finally:
            await engine.stop()

    greedy, sampled, again = asyncio.run(run())
    lm = engine.lm
    want = resolve_device(device)
    assert lm.device == want and lm.bank.device == want
    assert {p.device for p in lm.model.parameters()} == {want}
    assert lm.bank.dtype == lm.model.dtype == torch.float32  # "auto" dtype on the CPU
    assert len(greedy) == 6 and sampled == again  # a seeded sample repeats on its device


def _weights(bank: LoRABank, seed: int, scale: float = 0.05) -> LoRAWeights:
    gen = torch.Generator().manual_seed(seed)
    w = LoRAWeights(bank.rank, bank.alpha)
    for name, layer in bank.layers.items():
        w.a[name] = torch.randn(bank.rank, layer.base.in_features, generator=gen) * scale
        w.b[name] = torch.randn(layer.base.out_features, bank.rank, generator=gen) * scale
    return w


def _step(lm: LoadedModel, weights: LoRAWeights, lr: float) -> LoRAWeights:
    prompt = list(lm.tokenizer("Tell me about bread")["input_ids"])
    user = UserBatch(weights, AdamState(), 0.0, [prompt], [prompt[1:5]], [1.0])
    cfg = ReinforceConfig(learning_rate=lr, kl_coef=0.05)
    (update,) = reinforce_step(lm, [user], cfg)
    assert update.grad_norm > 0
    return update.weights


@pytest.mark.parametrize("device", ["cpu", "auto"])
def test_learner_step_on_the_device(tmp_path: Path, device: str) -> None:
    lm = load_model(Settings(device=device, adapter_store=tmp_path), slots=3)
    assert lm.device == resolve_device(device)
    before = _weights(lm.bank, 1)
    after = _step(lm, before, lr=1e-3)
    # the updated weights come back to the host, whatever the model's device
    assert {t.device.type for t in [*after.a.values(), *after.b.values()]} == {"cpu"}
    assert max(float((after.b[n] - before.b[n]).abs().max()) for n in before.b) > 0


def test_a_bfloat16_bank_keeps_float32_master_weights(tmp_path: Path) -> None:
    """On a bf16 model (the CUDA default) the step moves the user's own float32 weights,
    not the bank's bf16 copy: Adam's first step moves each weight by exactly the learning
    rate, far below bf16's resolution at these values (about 2e-4), and nothing else."""
    lm = load_model(Settings(dtype="bfloat16", adapter_store=tmp_path), slots=3)
    assert lm.bank.dtype == torch.bfloat16
    lr = 1e-5
    before = _weights(lm.bank, 2)
    after = _step(lm, before, lr)
    for n in before.a:
        for old, new in ((before.a[n], after.a[n]), (before.b[n], after.b[n])):
            assert new.dtype == torch.float32
            moved = (new - old).abs()
            assert float(moved.max()) <= lr * 1.001, n
    moved_b = max(float((after.b[n] - before.b[n]).abs().max()) for n in before.b)
    assert moved_b == pytest.approx(lr, rel=1e-3)
