"""One policy-gradient step for many users: batched multi-LoRA vs a per-user peft loop.

Three ways to run the same forward + backward over the same tokens (a random-weight
Llama, hidden 256 / 4 layers, rank-8 adapters on q/k/v/o):

- base: the base model's own forward + backward (gradients for q/k/v/o), the floor;
- batched: the learner's way, every user's row through its own slot of the LoRA bank,
  one forward and one backward for all users;
- loop: peft with one adapter per user, `set_adapter`, forward + backward user by user.

It checks that each user's gradients are the loop's: up to rounding, as the two sum in
different orders (reported in float32 and in float64, in units of that dtype's eps), then
times interleaved repeats and prints medians and ratios. Targets: batched <= 1.1x base,
>= 5x the loop at 32 users x 1 sample.

    GLIBC_TUNABLES=glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=17179869184 \\
        python benchmarks/bench_learner_step.py [--users 32 --samples 1 --tokens 48]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from loraloop.core.logprobs import response_logprobs
from loraloop.core.multi_lora import LoRABank, LoRAWeights

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]
RANK, ALPHA = 8, 16.0


def build(hidden: int, layers: int) -> LlamaForCausalLM:
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=2048,
        hidden_size=hidden,
        intermediate_size=hidden * 11 // 4,
        num_hidden_layers=layers,
        num_attention_heads=hidden // 64,
        num_key_value_heads=hidden // 64,
        max_position_embeddings=512,
    )
    model = LlamaForCausalLM(cfg).eval()
    model.requires_grad_(False)
    return model


def adapters(bank: LoRABank, users: int) -> list[LoRAWeights]:
    gen = torch.Generator().manual_seed(1)
    out = []
    for _ in range(users):
        w = LoRAWeights(RANK, ALPHA)
        for name, layer in bank.layers.items():
            w.a[name] = torch.randn(RANK, layer.base.in_features, generator=gen) * 0.05
            w.b[name] = torch.randn(layer.base.out_features, RANK, generator=gen) * 0.05
        out.append(w)
    return out


def data(users: int, samples: int, tokens: int) -> tuple[list[list[int]], list[list[int]]]:
    gen = torch.Generator().manual_seed(2)
    prompt_len = tokens // 3
    rows = users * samples
    ids = torch.randint(4, 2048, (rows, tokens), generator=gen).tolist()
    return [r[:prompt_len] for r in ids], [r[prompt_len:] for r in ids]


def timed(fn: Callable[[], None]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--users", type=int, default=32)
    parser.add_argument("--samples", type=int, default=1, help="samples per user")
    parser.add_argument("--tokens", type=int, default=48, help="tokens per sample")
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=7)
    ns = parser.parse_args()
    torch.set_num_threads(2)
    users, samples = ns.users, ns.samples
    prompts, responses = data(users, samples, ns.tokens)
    slots = [1 + i // samples for i in range(users * samples)]

    # --- batched: the learner's bank ----------------------------------------------------
    model = build(ns.hidden, ns.layers)
    bank = LoRABank(model, TARGETS, users + 1, RANK, ALPHA)
    weights = adapters(bank, users)
    for k, w in enumerate(weights):
        bank.load(k + 1, w)

    def batched() -> None:
        for p in bank.parameters():
            p.requires_grad_(True)
            p.grad = None
        logps = response_logprobs(model, bank, prompts, responses, slots)
        torch.stack([-lp.mean() for lp in logps]).sum().backward()

    # --- base: the same tokens through the plain model, grads on q/k/v/o ------------------
    base_targets = [layer.base.weight for layer in bank.layers.values()]

    def base() -> None:
        for w in base_targets:
            w.requires_grad_(True)
            w.grad = None
        logps = response_logprobs(model, bank, prompts, responses, [0] * len(slots))
        torch.stack([-lp.mean() for lp in logps]).sum().backward()
        for w in base_targets:
            w.requires_grad_(False)

    # --- loop: peft, one adapter per user ---------------------------------------------------
    from peft import LoraConfig, get_peft_model

    peft_base = build(ns.hidden, ns.layers)
    config = LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=TARGETS, lora_dropout=0.0)
    peft_model = get_peft_model(peft_base, config, adapter_name="u0")
    for k in range(1, users):
        peft_model.add_adapter(f"u{k}", config)
    with torch.no_grad():
        for name, module in peft_model.named_modules():
            if hasattr(module, "lora_A") and isinstance(module.lora_A, torch.nn.ModuleDict):
                key = name.removeprefix("base_model.model.")
                for k, w in enumerate(weights):
                    module.lora_A[f"u{k}"].weight.copy_(w.a[key])
                    module.lora_B[f"u{k}"].weight.copy_(w.b[key])

    def loop() -> None:
        for k in range(users):
            peft_model.set_adapter(f"u{k}")  # makes only this adapter trainable
            rows = range(k * samples, (k + 1) * samples)
            ids = [prompts[i] + responses[i] for i in rows]
            x = torch.tensor(ids)
            logits = peft_model(input_ids=x).logits[:, :-1].float().log_softmax(-1)
            start = len(prompts[0]) - 1
            token = logits.gather(-1, x[:, 1:, None]).squeeze(-1)[:, start:]
            (-token.mean(dim=1)).sum().backward()

    # --- gradients must match the loop's ---------------------------------------------------
    def grad_gap() -> tuple[float, float]:
        """(max |batched grad - loop grad|, max |loop grad|) over every user's A and B."""
        batched()
        for p in peft_model.parameters():
            p.grad = None
        loop()
        worst = largest = 0.0
        for name, module in peft_model.named_modules():
            if hasattr(module, "lora_A") and isinstance(module.lora_A, torch.nn.ModuleDict):
                key = name.removeprefix("base_model.model.")
                layer = bank.layers[key]
                for k in range(users):
                    ga = module.lora_A[f"u{k}"].weight.grad
                    gb = module.lora_B[f"u{k}"].weight.grad
                    worst = max(
                        worst,
                        float((layer.lora_A.grad[k + 1] - ga).abs().max()),
                        float((layer.lora_B.grad[k + 1] - gb).abs().max()),
                    )
                    largest = max(largest, float(ga.abs().max()), float(gb.abs().max()))
        for p in [*bank.parameters(), *peft_model.parameters()]:
            p.grad = None
        return worst, largest

    # The two paths sum the same products in different orders (bmm vs peft's Linear layers;
    # BLAS also orders by CPU): in float32 they agree to a few eps32 x max|grad| per stage,
    # not bit for bit. In float64 (float32 weights are exact there) the same math agrees to
    # ~eps64; the log-softmax and transformers' RMSNorm still run in float32 on both paths.
    for dtype in (torch.float32, torch.float64):
        model.to(dtype)
        peft_model.to(dtype)
        worst, largest = grad_gap()
        ulps = worst / (torch.finfo(dtype).eps * largest)
        name = str(dtype).removeprefix("torch.")
        print(
            f"max |batched grad - loop grad| over {users} users, {name}: {worst:.2e}"
            f" = {ulps:.1f} eps x max|grad| ({largest:.2e})"
        )
    model.float()  # back to float32 for the timings (the round trip is exact)
    peft_model.float()

    times: dict[str, list[float]] = {"base": [], "batched": [], "loop": []}
    fns = {"base": base, "batched": batched, "loop": loop}
    for fn in fns.values():  # warm-up
        timed(fn)
    for _ in range(ns.repeats):
        for name, fn in fns.items():
            times[name].append(timed(fn))
    med = {k: statistics.median(v) for k, v in times.items()}
    print(
        f"{users} users x {samples} sample(s) x {ns.tokens} tokens, hidden {ns.hidden}, "
        f"{ns.layers} layers; median of {ns.repeats} interleaved repeats:"
    )
    for name in ("base", "batched", "loop"):
        print(
            f"  {name:8s} {med[name]:.3f} s  (min {min(times[name]):.3f}, "
            f"max {max(times[name]):.3f})"
        )
    print(f"batched / base = {med['batched'] / med['base']:.2f}x   (target <= 1.1)")
    print(f"loop / batched = {med['loop'] / med['batched']:.2f}x   (target >= 5)")
    print(f"user updates per second, batched: {users / med['batched']:.0f}")


if __name__ == "__main__":
    main()
