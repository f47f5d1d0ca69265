"""Tiered adapter cache at 10,000 users: engine slots ← host-RAM LRU ← adapter store.

Writes one adapter version per user into a fresh store (PEFT files of the tiny model's
shape), then replays a Zipf-distributed request trace through the same path the hf engine
uses (`AdapterSlots.acquire` → `HostAdapterCache.get` → `read_peft_dir` → `LoRABank.load`)
and prints memory per adapter, hit rates per tier, and load latencies (cold: from the store;
warm: from host RAM into a slot).

    python benchmarks/bench_adapter_cache.py                      # 10,000 users, ~1 minute
    python benchmarks/bench_adapter_cache.py --users 20000 --host-mb 256
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from loraloop.core.adapters.peft_format import to_peft_files
from loraloop.core.adapters.store import AdapterStore
from loraloop.core.model_loading import load_model
from loraloop.core.multi_lora import LoRAWeights
from loraloop.core.settings import Settings
from loraloop.devtools.tiny_model import ensure_tiny_model
from loraloop.service.adapters.host_cache import HostAdapterCache, adapter_bytes
from loraloop.service.adapters.slots import AdapterSlots


def pct(values: list[float], q: float) -> float:
    return float(np.percentile(np.array(values) * 1000, q)) if values else float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--users", type=int, default=10_000)
    parser.add_argument("--requests", type=int, default=50_000)
    parser.add_argument("--zipf", type=float, default=1.1, help="popularity skew of users")
    parser.add_argument("--slots", type=int, default=64, help="engine slots (adapter_slots)")
    parser.add_argument("--host-mb", type=int, default=2048, help="host_cache_mb")
    args = parser.parse_args()
    torch.set_num_threads(2)

    with tempfile.TemporaryDirectory() as tmp:
        settings = Settings(model=str(ensure_tiny_model(progress=False)), adapter_store=Path(tmp))
        lm = load_model(settings, slots=args.slots + 1)
        bank = lm.bank
        store = AdapterStore(tmp)
        gen = torch.Generator().manual_seed(0)
        template = LoRAWeights(settings.lora_rank, settings.lora_alpha)
        for name, layer in bank.layers.items():
            template.a[name] = torch.randn(
                settings.lora_rank, layer.base.in_features, generator=gen
            )
            template.b[name] = torch.randn(
                layer.base.out_features, settings.lora_rank, generator=gen
            )
        files = to_peft_files(template, "tiny", settings.lora_targets)
        start = time.perf_counter()
        refs = [store.write(f"user{u}", 1, files) for u in range(args.users)]
        print(
            f"wrote {args.users} adapter versions in {time.perf_counter() - start:.1f}s "
            f"({len(files['adapter_model.safetensors']) / 1024:.0f} KiB of weights each)"
        )

        host = HostAdapterCache(args.host_mb * 2**20, settings.host_cache_adapters)
        slots = AdapterSlots(bank.slots, bank.load)
        rng = np.random.default_rng(0)
        ranks = rng.zipf(args.zipf, size=args.requests * 2)
        # Every user once (in random order), then a Zipf trace of returning users.
        trace = rng.permutation(args.users).tolist()
        trace += (ranks[ranks <= args.users][: args.requests] - 1).tolist()
        perm = rng.permutation(args.users)  # popularity unrelated to user number
        cold, warm, hot = [], [], []
        distinct = set()
        with torch.no_grad():
            for i in trace:
                ref = refs[int(perm[i])]
                key = (ref.user_id, ref.version)
                distinct.add(key)
                in_host = key in host
                misses = slots.misses
                t0 = time.perf_counter()
                slots.acquire(key, lambda ref=ref: host.get(ref), set())
                dt = time.perf_counter() - t0
                if slots.misses == misses:
                    hot.append(dt)
                elif in_host:
                    warm.append(dt)
                else:
                    cold.append(dt)
        per_adapter = adapter_bytes(host.get(refs[0]))
        n = len(trace)
        print(
            f"\n{n} requests from {len(distinct)} distinct users (each once, then Zipf "
            f"s={args.zipf}; files in the page cache), "
            f"{args.slots} engine slots, host cache {args.host_mb} MiB"
        )
        print(
            f"  memory per adapter (rank {settings.lora_rank}, {len(bank.layers)} modules, "
            f"{lm.model.dtype}): {per_adapter / 1024:.0f} KiB in host RAM, same in a slot"
        )
        print(
            f"  host cache: {len(host)} adapters, {host.bytes / 2**20:.0f} MiB "
            f"(capacity {args.host_mb * 2**20 // per_adapter} adapters)"
        )
        print(
            f"  engine-slot hit rate {len(hot) / n:.1%}   host-RAM hit rate (of slot misses) "
            f"{len(warm) / max(1, len(warm) + len(cold)):.1%}   store reads {len(cold)}"
        )
        print(
            f"  cold load (store -> slot): p50 {pct(cold, 50):.2f} ms  p95 {pct(cold, 95):.2f}"
            f" ms  p99 {pct(cold, 99):.2f} ms   (target p95 <= 20 ms)"
        )
        print(
            f"  warm load (host RAM -> slot): p50 {pct(warm, 50):.3f} ms  p95 "
            f"{pct(warm, 95):.3f} ms;  slot hit p95 {pct(hot, 95):.4f} ms"
        )


if __name__ == "__main__":
    main()
