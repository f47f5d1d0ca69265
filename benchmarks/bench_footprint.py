"""What one user costs the deployment: bytes in the adapter store and on the topics, and the
S3 store's write, list and fetch times (against a real SeaweedFS on loopback). The
figures docs/SCALING.md extrapolates from.

- adapter version bytes: the files the learner writes (PEFT safetensors + config + the
  learner state), for the tiny model as built here and for Llama-architecture shapes of
  real models (1B, 8B, 70B: hidden, layers, heads and KV heads from their published
  configs), at the configured rank and targets; weights stored in float32, as the learner
  writes them;
- event bytes: an Interaction and a FeedbackEvent as the server builds them, serialized,
  for a chat-sized prompt and reply (prompt 130 / reply 32 tokens, and 512 / 256);
- the S3 store: write a version (files, then manifest), list a user's versions, fetch a
  version into a fresh host copy (checksums verified), for the tiny model's version and for
  an 8B-sized one; medians of interleaved repeats;
- the registry's memory per user a server knows (one entry per user, measured with
  tracemalloc over 100,000 users).

    python benchmarks/bench_footprint.py [--repeats 5] [--no-s3]
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import tempfile
import time
import tracemalloc
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from loraloop.core.adapters.peft_format import to_peft_files
from loraloop.core.adapters.s3_store import S3AdapterStore
from loraloop.core.adapters.version import AdapterVersion
from loraloop.core.gen.loraloop.v1 import common_pb2, events_pb2
from loraloop.core.multi_lora import LoRAWeights
from loraloop.core.settings import Settings
from loraloop.devtools.tiny_model import ensure_tiny_model


@dataclass(frozen=True)
class Shape:
    """What LoRA shapes depend on in a Llama-architecture model."""

    name: str
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int

    def linear(self, target: str) -> tuple[int, int]:
        """(in, out) features of one target module."""
        head_dim = self.hidden // self.heads
        kv = self.kv_heads * head_dim
        return {
            "q_proj": (self.hidden, self.hidden),
            "k_proj": (self.hidden, kv),
            "v_proj": (self.hidden, kv),
            "o_proj": (self.hidden, self.hidden),
            "gate_proj": (self.hidden, self.intermediate),
            "up_proj": (self.hidden, self.intermediate),
            "down_proj": (self.intermediate, self.hidden),
        }[target]


# Published configs (config.json of each model family): hidden, layers, heads, KV heads,
# intermediate size.
REAL_SHAPES = (
    Shape("Llama-3.2-1B", 2048, 16, 32, 8, 8192),
    Shape("Llama-3.1-8B", 4096, 32, 32, 8, 14336),
    Shape("Llama-3.1-70B", 8192, 80, 64, 8, 28672),
)


def tiny_shape() -> Shape:
    config = json.loads((ensure_tiny_model(progress=False) / "config.json").read_text())
    return Shape(
        "tiny (this repo)",
        config["hidden_size"],
        config["num_hidden_layers"],
        config["num_attention_heads"],
        config.get("num_key_value_heads", config["num_attention_heads"]),
        config["intermediate_size"],
    )


def version_files(shape: Shape, settings: Settings) -> dict[str, bytes]:
    """The files of one adapter version for this shape (random weights, float32)."""
    weights = LoRAWeights(settings.lora_rank, settings.lora_alpha)
    for layer in range(shape.layers):
        for target in settings.lora_targets:
            fan_in, fan_out = shape.linear(target)
            name = f"model.layers.{layer}.self_attn.{target}"
            weights.a[name] = torch.randn(settings.lora_rank, fan_in)
            weights.b[name] = torch.randn(fan_out, settings.lora_rank)
    return to_peft_files(weights, "base/model", settings.lora_targets)


def learner_state_bytes() -> int:
    """A learner state of the size a version carries after ~100 interactions."""
    state = {
        "baseline": 0.41,
        "updates": 100,
        "applied_offsets": {str(p): [[0, 4000]] for p in range(4)},
        "learnt_from": [
            [f"{i:012x}-0123456789abcdef.abcdefgh.ijklmnop", f"0:{i}"] for i in range(8)
        ],
        "guard": {"best_version": 12, "window": [0.5] * 20},
        "bandit": {"arms": {f"arm{a}": {"n": 20, "mean": 0.5} for a in range(6)}},
    }
    return len(json.dumps(state, sort_keys=True).encode())


def event_bytes(prompt_tokens: int, reply_tokens: int) -> tuple[int, int]:
    """Serialized sizes of an Interaction and its FeedbackEvent."""
    rid = f"{int(time.time() * 1000):012x}-0123456789abcdef.abcdefghijklmnop.qrstuvwxyzabcdef"
    interaction = events_pb2.Interaction(
        request_id=rid,
        user_id="user-000123456",
        timestamp_ms=int(time.time() * 1000),
        prompt_token_ids=[1000 + i % 30000 for i in range(prompt_tokens)],
        response_token_ids=[2000 + i % 30000 for i in range(reply_tokens)],
        behaviour_logprobs=[-1.234567 - i / 1000 for i in range(reply_tokens)],
        adapter_version=42,
        arm="concise",
    )
    feedback = events_pb2.FeedbackEvent(
        request_id=rid,
        user_id="user-000123456",
        timestamp_ms=int(time.time() * 1000),
        signals=common_pb2.FeedbackSignals(thumbs=1, dwell_ms=5200, accepted=True),
    )
    return len(interaction.SerializeToString()), len(feedback.SerializeToString())


def registry_bytes_per_user(users: int = 100_000) -> float:
    """tracemalloc's count for a dict of AdapterVersion refs (what the registry holds)."""
    gc.collect()
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    root = Path("/copies")
    held = {
        f"user-{i:09d}": AdapterVersion(f"user-{i:09d}", 7, root / f"user-{i:09d}" / "v7")
        for i in range(users)
    }
    checked = set(held)
    after = tracemalloc.get_traced_memory()[0]
    tracemalloc.stop()
    del held, checked
    return (after - before) / users


def s3_times(files: dict[str, bytes], repeats: int, tmp: Path) -> dict[str, float]:
    """Median seconds of write / list / fetch of one version against SeaweedFS."""
    from loraloop.devtools.s3_server import SeaweedS3

    with SeaweedS3(tmp / "s3", buckets=("adapters",)) as server:
        os.environ.update(server.env())
        writer = S3AdapterStore("s3://adapters/bench", tmp / "writer")
        write, listing, fetch = [], [], []
        for i in range(repeats):
            user = f"u{i}"
            start = time.perf_counter()
            writer.write(user, 1, files, {"n": i})
            write.append(time.perf_counter() - start)
            reader = S3AdapterStore("s3://adapters/bench", tmp / f"reader{i}")
            start = time.perf_counter()
            assert reader.versions(user) == [1]
            listing.append(time.perf_counter() - start)
            start = time.perf_counter()
            reader.get(user, 1)
            fetch.append(time.perf_counter() - start)
        return {
            "write": statistics.median(write),
            "list": statistics.median(listing),
            "fetch": statistics.median(fetch),
        }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--no-s3", action="store_true", help="skip the S3 timings")
    args = parser.parse_args()
    settings = Settings(model=str(ensure_tiny_model(progress=False)))
    state = learner_state_bytes()
    print(
        f"adapter version bytes (rank {settings.lora_rank}, targets "
        f"{','.join(settings.lora_targets)}, float32; learner state ~{state} B)"
    )
    print(f"{'model':<18} {'hidden x layers':>16} {'params':>12} {'version MB':>11}")
    sized: dict[str, dict[str, bytes]] = {}
    for shape in (tiny_shape(), *REAL_SHAPES):
        files = version_files(shape, settings)
        sized[shape.name] = files
        params = (
            sum(settings.lora_rank * sum(shape.linear(t)) for t in settings.lora_targets)
            * shape.layers
        )
        total = sum(len(b) for b in files.values()) + state + 64  # + the checksum file
        size = f"{shape.hidden} x {shape.layers}"
        print(f"{shape.name:<18} {size:>16} {params:>12,} {total / 1e6:>11.3f}")
    print("\nevent bytes on the topics (serialized protobuf; Kafka adds ~70 B a record)")
    for p, r in ((130, 32), (512, 256)):
        i, f = event_bytes(p, r)
        print(f"  prompt {p} / reply {r} tokens: Interaction {i} B, FeedbackEvent {f} B")
    print(f"\nregistry memory per user known to a server: {registry_bytes_per_user():.0f} B")
    if not args.no_s3:
        with tempfile.TemporaryDirectory() as tmp:
            print(f"\nS3 store on SeaweedFS (loopback), medians of {args.repeats}:")
            for name in ("tiny (this repo)", "Llama-3.1-8B"):
                files = sized[name]
                mb = sum(len(b) for b in files.values()) / 1e6
                t = s3_times(files, args.repeats, Path(tmp) / name.split()[0])
                print(
                    f"  {name:<18} {mb:8.3f} MB: write {1000 * t['write']:7.1f} ms, list "
                    f"{1000 * t['list']:6.1f} ms, fetch {1000 * t['fetch']:7.1f} ms "
                    f"({mb / t['fetch']:.0f} MB/s)"
                )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
