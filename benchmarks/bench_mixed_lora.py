"""Mixed-adapter decoding throughput: one batch of 32 requests with 32 different adapters.

Four ways to decode the same 32 prompts for 64 greedy tokens, on random-weight Llama models
built here (hidden 256 / 4 layers and hidden 512 / 8 layers), all through the hf engine's
own decode loop (`RunningBatch`: left-padded KV cache, one forward per step):

- base: the plain model, no adapters (the ceiling);
- mixed: the engine's multi-LoRA bank, every row through its own adapter slot;
- peft adapter_names: peft's mixed-batch inference (sub-batches per adapter);
- per-request switching: peft `set_adapter`, one request at a time.

Repeats are interleaved (base, mixed, peft, base, mixed, ...) and medians reported, because
this machine is shared and noisy. The adapters go through the real files: written in PEFT's
format, loaded by peft with `load_adapter` and by the engine with `read_peft_dir`, and the
script checks that the engine's tokens equal peft's token for token.

    GLIBC_TUNABLES=glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=17179869184 \\
        python benchmarks/bench_mixed_lora.py            # both sizes, ~4 minutes on 2 cores
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from loraloop.core.adapters.peft_format import read_peft_dir, to_peft_files
from loraloop.core.adapters.store import AdapterStore
from loraloop.core.multi_lora import LoRABank, LoRAWeights
from loraloop.service.engines.batching import RunningBatch

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]
RANK, ALPHA = 8, 16.0
PAD = 0


def build_model(
    hidden: int, layers: int, seed: int = 0, device: str = "cpu", dtype: torch.dtype = torch.float32
) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=4096,
        hidden_size=hidden,
        intermediate_size=hidden * 8 // 3 // 64 * 64,
        num_hidden_layers=layers,
        num_attention_heads=hidden // 64,
        num_key_value_heads=hidden // 64,
        max_position_embeddings=512,
        initializer_range=0.08,  # peaked logits: fewer float ties between near-equal tokens
        pad_token_id=PAD,
        tie_word_embeddings=False,
    )
    with torch.device(device):  # initialise in place: a GPU builds a 1B model in seconds
        model = LlamaForCausalLM(config)
    return model.to(dtype).eval().requires_grad_(False)


def random_adapter(model: torch.nn.Module, seed: int) -> LoRAWeights:
    gen = torch.Generator().manual_seed(seed)
    weights = LoRAWeights(RANK, ALPHA)
    for name, module in model.named_modules():
        if name.rsplit(".", 1)[-1] in TARGETS and isinstance(module, torch.nn.Linear):
            a = torch.randn(RANK, module.in_features, generator=gen) * 0.05
            b = torch.randn(module.out_features, RANK, generator=gen) * 0.05
            weights.a[name], weights.b[name] = a.to(module.weight.dtype), b.to(module.weight.dtype)
    return weights


def decode(
    model: torch.nn.Module,
    bank: LoRABank | None,
    prompts: list[list[int]],
    slots: list[int],
    steps: int,
) -> list[list[int]]:
    """Greedy-decode every prompt for `steps` tokens in one running batch."""
    batch = RunningBatch(model, bank, PAD)
    tokens = batch.add(prompts, slots).argmax(-1)
    out = [tokens]
    for _ in range(steps - 1):
        tokens = batch.step(tokens).argmax(-1)
        out.append(tokens)
    return torch.stack(out, 1).tolist()


class PeftMixed(torch.nn.Module):
    """Calls a PeftModel with `adapter_names` for the rows of the running batch."""

    def __init__(self, peft_model: torch.nn.Module) -> None:
        super().__init__()
        self.peft_model = peft_model
        self.names: list[str] = []

    def forward(self, **kwargs: object) -> object:
        return self.peft_model(**kwargs, adapter_names=self.names)


def run_size(
    hidden: int,
    layers: int,
    n: int,
    steps: int,
    repeats: int,
    device: str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> dict[str, float]:
    from peft import PeftModel

    base = build_model(hidden, layers, device=device, dtype=dtype)
    gen = torch.Generator().manual_seed(1)
    lengths = torch.randint(12, 33, (n,), generator=gen).tolist()
    prompts = [torch.randint(4, 4096, (k,), generator=gen).tolist() for k in lengths]

    with tempfile.TemporaryDirectory() as tmp:
        store = AdapterStore(tmp)
        dirs = []
        for i in range(n):
            files = to_peft_files(random_adapter(base, 100 + i), "random-llama", TARGETS)
            dirs.append(store.write(f"user{i}", 1, files).path)

        mixed_model = copy.deepcopy(base)
        bank = LoRABank(mixed_model, TARGETS, n + 1, RANK, ALPHA)
        for i, d in enumerate(dirs):
            bank.load(i + 1, read_peft_dir(d))
        slots = list(range(1, n + 1))

        peft_model = PeftModel.from_pretrained(copy.deepcopy(base), dirs[0], adapter_name="a0")
        for i in range(1, n):
            peft_model.load_adapter(dirs[i], adapter_name=f"a{i}")
        peft_model.eval().to(device)
    names = [f"a{i}" for i in range(n)]
    peft_mixed = PeftMixed(peft_model)
    peft_mixed.names = names

    def per_request(count: int = n) -> list[list[int]]:
        outs = []
        for i in range(count):
            peft_model.set_adapter(names[i])
            outs += decode(peft_model, None, [prompts[i]], [0], steps)
        return outs

    methods: dict[str, Callable[[], list[list[int]]]] = {
        "base": lambda: decode(base, None, prompts, slots, steps),
        "mixed": lambda: decode(mixed_model, bank, prompts, slots, steps),
        "peft_adapter_names": lambda: decode(peft_mixed, None, prompts, slots, steps),
        "per_request_switching": per_request,
    }
    # Switching is ~10-20x slower per token: its timed runs decode a quarter of the requests
    # one at a time (tokens/s does not depend on how many); all 32 are compared for equality.
    switch_count = max(1, n // 4)
    timed = dict(methods, per_request_switching=lambda: per_request(switch_count))
    counts = {name: n for name in methods} | {"per_request_switching": switch_count}
    with torch.no_grad():
        outputs = {name: fn() for name, fn in methods.items()}  # warm-up and outputs
        times: dict[str, list[float]] = {name: [] for name in methods}
        for r in range(repeats):
            order = list(methods)
            order = order[r % len(order) :] + order[: r % len(order)]  # rotate: no fixed slot
            for name in order:
                start = time.perf_counter()
                timed[name]()
                times[name].append(time.perf_counter() - start)
    tok_s = {name: counts[name] * steps / statistics.median(t) for name, t in times.items()}
    same_names = sum(
        a == b for a, b in zip(outputs["mixed"], outputs["peft_adapter_names"], strict=True)
    )
    same_switch = sum(
        a == b for a, b in zip(outputs["mixed"], outputs["per_request_switching"], strict=True)
    )
    differs_from_base = sum(a != b for a, b in zip(outputs["mixed"], outputs["base"], strict=True))

    print(
        f"\n=== hidden {hidden}, {layers} layers, {device} {str(dtype).removeprefix('torch.')}: "
        f"{n} requests x {n} rank-{RANK} adapters (q/k/v/o), {steps} greedy tokens, "
        f"medians of {repeats} interleaved repeats ==="
    )
    for name in methods:
        print(
            f"  {name:<24} {tok_s[name]:>8.0f} tok/s   {tok_s[name] / tok_s['base']:5.2f}x base"
            f"   (runs: {', '.join(f'{t:.2f}s' for t in times[name])})"
        )
    print(
        f"  mixed / per-request switching: {tok_s['mixed'] / tok_s['per_request_switching']:.1f}x"
    )
    print(f"  mixed / peft adapter_names:    {tok_s['mixed'] / tok_s['peft_adapter_names']:.1f}x")
    print(
        f"  token-for-token equal to peft: adapter_names {same_names}/{n} rows, "
        f"set_adapter {same_switch}/{n} rows; adapters changed {differs_from_base}/{n} rows"
    )
    return {
        "ratio_mixed_base": tok_s["mixed"] / tok_s["base"],
        "ratio_mixed_switching": tok_s["mixed"] / tok_s["per_request_switching"],
        "equal_rows": min(same_names, same_switch),
        "rows": n,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", default="256x4,512x8", help="hidden x layers, comma-separated")
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu", help="cpu, or cuda on a GPU machine")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    results = {}
    for size in args.sizes.split(","):
        hidden, layers = (int(v) for v in size.split("x"))
        results[size] = run_size(
            hidden, layers, args.requests, args.tokens, args.repeats, args.device, dtype
        )
    print(
        "\nsummary (targets: mixed >= 0.9x base, >= 0.95x from hidden 512; >= 10x switching;"
        " identical to peft):"
    )
    for size, r in results.items():
        print(
            f"  {size:<8} mixed/base {r['ratio_mixed_base']:.2f}x   "
            f"mixed/switching {r['ratio_mixed_switching']:.1f}x   "
            f"equal to peft {r['equal_rows']}/{r['rows']} rows"
        )


if __name__ == "__main__":
    main()
