"""The hf engine and the learner's step on one device (`Settings.device`), end to end.

Loads a model through `load_model` with `device`/`dtype` as the settings give them (the
path `loraloop serve` and `loraloop learn` take), then:

- the hf engine (`HFEngine`): `requests` concurrent requests, each through its own stored
  adapter version (mixed batch, continuous batching), half greedy, half sampled with a seed;
  tokens per second, medians of `repeats`;
- the learner's batched step (`reinforce_step`, KL penalty on): `requests` users x 1 sample
  in one forward/backward, seconds per step, medians of `repeats` after a warm-up.

It checks that the model, its bank and the step's inputs are on the device, that a seeded
sample repeats, and that the updated weights come back to the host in float32. `--hidden`
and `--layers` replace the model's weights by a random Llama of that size (same tokenizer
and vocabulary), so a GPU gets a model big enough to measure.

    python benchmarks/bench_device.py --model DIR --device cuda --hidden 2048 --layers 16
    python benchmarks/bench_device.py --model DIR --device cpu --hidden 256 --layers 2
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from loraloop.core.adapters.peft_format import to_peft_files
from loraloop.core.adapters.store import AdapterStore
from loraloop.core.adapters.version import AdapterVersion
from loraloop.core.model_loading import load_model
from loraloop.core.multi_lora import LoRAWeights
from loraloop.core.settings import Settings
from loraloop.learner.algos.reinforce import (
    AdamState,
    ReinforceConfig,
    UserBatch,
    reinforce_step,
)
from loraloop.service.engines.hf import HFEngine
from loraloop.service.engines.protocol import GenerationRequest


def resized(model_dir: Path, hidden: int, layers: int, out: Path) -> Path:
    """A random Llama of `hidden` x `layers` with the tokenizer of `model_dir`."""
    from transformers import AutoConfig, LlamaForCausalLM

    config = AutoConfig.from_pretrained(model_dir)
    config.hidden_size, config.num_hidden_layers = hidden, layers
    config.intermediate_size = hidden * 8 // 3
    config.num_attention_heads = config.num_key_value_heads = max(1, hidden // 64)
    config.head_dim = hidden // config.num_attention_heads
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(out)
    for item in model_dir.iterdir():
        if item.name.startswith("tokenizer") or item.suffix == ".jinja":
            shutil.copy(item, out / item.name)
    return out


def adapter(bank_layers: dict[str, tuple[int, int]], rank: int, seed: int) -> LoRAWeights:
    gen = torch.Generator().manual_seed(seed)
    w = LoRAWeights(rank, 2.0 * rank)
    for name, (fan_in, fan_out) in bank_layers.items():
        w.a[name] = torch.randn(rank, fan_in, generator=gen) / fan_in**0.5
        w.b[name] = torch.randn(fan_out, rank, generator=gen) * 0.02
    return w


async def engine_run(engine: HFEngine, requests: list[GenerationRequest]) -> list[list[int]]:
    async def one(request: GenerationRequest) -> list[int]:
        return [t async for chunk in engine.stream(request) for t in chunk.token_ids]

    return list(await asyncio.gather(*(one(r) for r in requests)))


def bench_engine(settings: Settings, args: argparse.Namespace, store_dir: Path) -> float:
    engine = HFEngine(settings)
    loop = asyncio.new_event_loop()
    loop.run_until_complete(engine.start())
    try:
        lm = engine.lm
        device = lm.device
        assert {p.device for p in lm.model.parameters()} == {device}, "model off its device"
        layers = {n: (m.base.in_features, m.base.out_features) for n, m in lm.bank.layers.items()}
        store = AdapterStore(store_dir)
        refs = []
        for u in range(args.requests):
            files = to_peft_files(
                adapter(layers, settings.lora_rank, u), "bench", settings.lora_targets
            )
            refs.append(AdapterVersion(f"user{u}", 1, store.write(f"user{u}", 1, files).path))
        prompt = engine.encode("Tell me something about the city by the river", None)
        requests = [
            GenerationRequest(
                f"r{i}", prompt, refs[i], args.tokens, 0.0 if i % 2 == 0 else 1.0, 0.9, i
            )
            for i in range(args.requests)
        ]
        first = loop.run_until_complete(engine_run(engine, requests))  # warm-up, adapters loaded
        seconds, same = [], []
        for _ in range(args.repeats):
            started = time.perf_counter()
            again = loop.run_until_complete(engine_run(engine, requests))
            if device.type == "cuda":
                torch.cuda.synchronize()
            seconds.append(time.perf_counter() - started)
            # batches may form differently run to run: near-ties in bf16 may then differ
            same.append(sum(a == b for a, b in zip(first, again, strict=True)))
        tokens = sum(len(t) for t in first)
        median = statistics.median(seconds)
        print(
            f"  hf engine on {device} {lm.model.dtype}: {args.requests} requests x "
            f"{args.requests} adapters, {tokens} tokens in {median:.3f} s: "
            f"{tokens / median:.0f} tok/s (runs {', '.join(f'{s:.3f}' for s in seconds)}); "
            f"peak batch {engine.peak_rows} rows; requests repeating the warm-up's tokens "
            f"(greedy, or sampled with their seed): {min(same)}/{len(requests)}"
        )
        return tokens / median
    finally:
        loop.run_until_complete(engine.stop())
        loop.close()


def bench_learner(settings: Settings, args: argparse.Namespace) -> float:
    lm = load_model(settings, slots=args.requests + 1)
    layers = {n: (m.base.in_features, m.base.out_features) for n, m in lm.bank.layers.items()}
    gen = torch.Generator().manual_seed(1)
    vocab = int(lm.model.config.vocab_size)
    prompt = torch.randint(3, vocab, (16,), generator=gen).tolist()
    users = [
        UserBatch(
            adapter(layers, settings.lora_rank, 100 + u),
            AdamState(),
            0.0,
            [prompt],
            [torch.randint(3, vocab, (args.tokens,), generator=gen).tolist()],
            [1.0 if u % 2 else -1.0],
            behaviour=[[-2.0] * args.tokens],
            temperatures=[1.0],
        )
        for u in range(args.requests)
    ]
    cfg = ReinforceConfig.from_settings(settings)
    updates = reinforce_step(lm, users, cfg)  # warm-up
    seconds = []
    for _ in range(args.repeats):
        started = time.perf_counter()
        updates = reinforce_step(lm, users, cfg)
        if lm.device.type == "cuda":
            torch.cuda.synchronize()
        seconds.append(time.perf_counter() - started)
    held = {(t.device.type, t.dtype) for u in updates for t in [*u.weights.a.values()]}
    assert held == {("cpu", torch.float32)}, f"updated weights held as {held}"
    assert all(u.grad_norm > 0 for u in updates), "a user got no gradient"
    median = statistics.median(seconds)
    print(
        f"  learner step on {lm.device} {lm.model.dtype}: {args.requests} users x 1 sample x "
        f"{args.tokens} tokens: {median:.3f} s (runs {', '.join(f'{s:.3f}' for s in seconds)}); "
        f"updates back on the host in float32, grad norms {min(u.grad_norm for u in updates):.3g}"
        f"..{max(u.grad_norm for u in updates):.3g}"
    )
    return median


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="a model directory (with tokenizer)")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"])
    parser.add_argument("--hidden", type=int, default=0, help="random Llama of this width")
    parser.add_argument("--layers", type=int, default=0, help="... and this many layers")
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-device-") as tmp:
        model = Path(args.model)
        if args.hidden:
            model = resized(model, args.hidden, args.layers or 2, Path(tmp) / "model")
        settings = Settings(
            model=str(model),
            device=args.device,
            dtype=args.dtype,
            adapter_store=Path(tmp) / "store",
            adapter_slots=args.requests,
            max_batch_size=args.requests,
        )
        print(f"=== {model.name}: device={args.device}, dtype={args.dtype} ===")
        bench_engine(settings, args, Path(tmp) / "store")
        bench_learner(settings, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
