"""Serving overheads through a real Kafka broker and the real gRPC server (hf engine, tiny
model): hot-swap latency, the cost of event logging, and the gRPC layer's share of TTFT.

- hot swap: a new adapter version is written to the store and its AdapterUpdated published
  to Kafka; clock stops at the first Generate reply that reports that version (a client
  keeps asking, max_tokens=1). Target p95 <= 250 ms.
- event logging: time spent building, serialising and queueing the Interaction event of a
  Generate (the server's `_response`, which also builds the reply). Target p99 <= 1 ms.
- gRPC and HTTP TTFT: time to the first streamed token through GenerateStream, and through
  the OpenAI-compatible API (a streamed /v1/completions with the `openai` client, which the
  server answers by calling the same GenerateStream), each from a client in its own process
  (as a real client is: it does not share the server's GIL), vs `engine.stream` on the
  server's own loop, same prompt, interleaved. Target <= 5 % more. Measured for the
  tiny model and for larger untrained Llamas with the tiny tokenizer (`--ttft-sizes`), with
  a chat-sized prompt (~130 tokens): a protocol's cost is fixed, so its share depends on how
  long the model takes to its first token.

    python benchmarks/bench_serving_overheads.py      # starts its own broker; ~3 minutes
    python benchmarks/bench_serving_overheads.py --swaps 5 --requests 20 --ttft-pairs 20 \
        --ttft-sizes ""                               # the small mode: tiny model only, ~1 minute
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing as mp
import shutil
import statistics
import sys
import tempfile
import time
from multiprocessing.connection import Connection
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from loraloop.client import LoraLoopClient
from loraloop.core.adapters.peft_format import to_peft_files
from loraloop.core.adapters.store import AdapterStore
from loraloop.core.gen.loraloop.v1 import events_pb2
from loraloop.core.kafka.admin import ensure_loraloop_topics
from loraloop.core.multi_lora import LoRAWeights
from loraloop.core.settings import Settings
from loraloop.devtools.kafka_broker import KafkaBroker
from loraloop.devtools.tiny_model import TinyModelSpec, ensure_tiny_model, init_model, make_config
from loraloop.service.engines.protocol import GenerationRequest
from tests.support import InProcessServer, isolated_settings


def ms(values: list[float], q: float) -> float:
    return float(np.percentile(np.array(values) * 1000, q))


PROMPT = (
    "I am planning a week in Tokyo in the spring with my partner and our two children. "
    "We like food markets, gardens, and quiet museums, and we would rather avoid long queues "
    "and very crowded places. We are staying near Shinjuku and can use the trains. What "
    "should we see, in which order, and where should we eat on the way? Please keep it short "
    "and practical, with one idea for a rainy day."
)


def build_untrained(size: str, out: Path) -> Path:
    """An untrained Llama of `size` ("hidden x layers", head size 64) with the tiny
    model's tokenizer, saved where the server can load it: latency needs no training."""
    from transformers import AutoTokenizer

    hidden, layers = (int(v) for v in size.split("x"))
    tokenizer = AutoTokenizer.from_pretrained(ensure_tiny_model(progress=False))
    spec = TinyModelSpec(
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=hidden // 64,
        num_key_value_heads=hidden // 64,
        intermediate_size=hidden * 8 // 3 // 64 * 64,
    )
    init_model(spec, make_config(spec, tokenizer)).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def _ttft_client(conn: Connection, target: str, prompt: str) -> None:
    """Child process: one streamed Generate per request from the parent, reply its TTFT."""
    with LoraLoopClient(target, timeout=120) as client:
        client.wait_ready()
        while conn.recv():
            start = time.perf_counter()
            # One token: an untrained model's first tokens may have no text, and the server
            # sends its first message with the first text (here: that, or the final one).
            for _ in client.stream("ttft", prompt, max_tokens=1, temperature=0.0):
                break
            conn.send(time.perf_counter() - start)


def _ttft_http_client(conn: Connection, base_url: str, model: str, prompt: str) -> None:
    """Child process: the same, as a streamed /v1/completions through the openai client."""
    import openai

    with openai.OpenAI(base_url=base_url, api_key="none", max_retries=0) as client:
        while conn.recv():
            start = time.perf_counter()
            stream = client.completions.create(
                model=model, prompt=prompt, user="ttft", max_tokens=1, temperature=0.0, stream=True
            )
            for _ in stream:
                break
            conn.send(time.perf_counter() - start)
            stream.close()


def protocols_vs_direct_ttft(
    server: InProcessServer, pairs: int
) -> tuple[list[float], list[float], list[float]]:
    """Interleaved TTFT triples: gRPC and HTTP from client processes, then the engine called
    directly."""
    engine = server.running.service.engine
    ids = engine.encode(PROMPT, None)

    async def direct() -> float:
        req = GenerationRequest("direct", ids, None, 1, temperature=0.0)
        start = time.perf_counter()
        async for _ in engine.stream(req):
            return time.perf_counter() - start
        return float("nan")

    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=_ttft_client, args=(child, server.target, PROMPT), daemon=True)
    proc.start()
    assert server.running.http is not None
    http_parent, http_child = ctx.Pipe()
    args = (http_child, f"{server.running.http.url}/v1", engine.model_id, PROMPT)
    http_proc = ctx.Process(target=_ttft_http_client, args=args, daemon=True)
    http_proc.start()
    grpc_t, http_t, direct_t = [], [], []
    try:
        for i in range(pairs + 5):  # the first 5 triples warm all paths up
            parent.send(True)
            g = parent.recv()
            http_parent.send(True)
            h = http_parent.recv()
            d = asyncio.run_coroutine_threadsafe(direct(), server.loop).result(120)
            if i >= 5:
                grpc_t.append(g)
                http_t.append(h)
                direct_t.append(d)
    finally:
        parent.send(False)
        http_parent.send(False)
        proc.join(30)
        http_proc.join(30)
    return grpc_t, http_t, direct_t


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--swaps", type=int, default=30)
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--ttft-pairs", type=int, default=60)
    parser.add_argument(
        "--ttft-sizes",
        default="512x8,1024x8",
        help="untrained Llama sizes (hidden x layers) for the TTFT comparison, besides tiny",
    )
    args = parser.parse_args()
    from kafka import KafkaProducer

    tmp = Path(tempfile.mkdtemp(prefix="bench-serving-"))
    broker = KafkaBroker(data_dir=tmp / "kafka")
    broker.start(timeout=180)
    server = None
    try:
        settings = isolated_settings(
            broker.bootstrap, tmp, model=str(ensure_tiny_model(progress=False)), max_new_tokens=32
        )
        ensure_loraloop_topics(settings)
        server = InProcessServer(settings)
        service = server.running.service
        engine = service.engine
        store = AdapterStore(settings.adapter_store)
        bank = engine.lm.bank  # type: ignore[attr-defined]

        # --- event logging cost inside Generate -------------------------------------------
        timings: list[float] = []
        original = service._response

        def timed(*a, **kw):
            start = time.perf_counter()
            try:
                return original(*a, **kw)
            finally:
                timings.append(time.perf_counter() - start)

        service._response = timed  # type: ignore[method-assign]
        with LoraLoopClient(server.target, timeout=60) as client:
            client.wait_ready()
            for i in range(args.requests):
                client.generate(f"log{i % 20}", "How do I cook rice?", max_tokens=4, seed=i)
        service._response = original  # type: ignore[method-assign]

        # --- hot swap through Kafka ---------------------------------------------------------
        producer = KafkaProducer(bootstrap_servers=broker.bootstrap, acks="all", linger_ms=0)
        gen = torch.Generator().manual_seed(0)
        swaps: list[float] = []
        with LoraLoopClient(server.target, timeout=60) as client:
            for version in range(1, args.swaps + 1):
                w = LoRAWeights(settings.lora_rank, settings.lora_alpha)
                for name, layer in bank.layers.items():
                    w.a[name] = (
                        torch.randn(settings.lora_rank, layer.base.in_features, generator=gen) * 0.1
                    )
                    w.b[name] = (
                        torch.randn(layer.base.out_features, settings.lora_rank, generator=gen)
                        * 0.1
                    )
                stored = store.write(
                    "swapper",
                    version,
                    to_peft_files(w, settings.model_id or settings.model, settings.lora_targets),
                )
                event = events_pb2.AdapterUpdated(
                    user_id="swapper",
                    version=version,
                    uri=stored.uri,
                    checksum=stored.checksum,
                    timestamp_ms=int(time.time() * 1000),
                )
                start = time.perf_counter()
                producer.send(
                    settings.topic_adapter_updates, key=b"swapper", value=event.SerializeToString()
                )
                producer.flush()
                while True:
                    reply = client.generate("swapper", "hi", max_tokens=1)
                    if reply.adapter_version >= version:
                        swaps.append(time.perf_counter() - start)
                        break
                    if time.perf_counter() - start > 30:
                        raise TimeoutError(f"version {version} never served")
        producer.close()

        print("\nhf engine, tiny model, real Kafka broker and gRPC server on loopback")
        print(
            f"  hot swap (publish -> first reply with the version), {len(swaps)} swaps: "
            f"p50 {ms(swaps, 50):.0f} ms  p95 {ms(swaps, 95):.0f} ms  max "
            f"{max(swaps) * 1000:.0f} ms   (target p95 <= 250 ms)"
        )
        print(
            f"  event logging + reply building per Generate, {len(timings)} requests: "
            f"p50 {ms(timings, 50):.3f} ms  p99 {ms(timings, 99):.3f} ms   "
            f"(target p99 <= 1 ms)"
        )
        server.stop()
        server = None
        ttft(settings, tmp, args.ttft_sizes, args.ttft_pairs)
    finally:
        if server is not None:
            server.stop()
        broker.stop()
        shutil.rmtree(tmp, ignore_errors=True)  # the larger models are hundreds of MB


def ttft(settings: Settings, tmp: Path, sizes: str, pairs: int) -> None:
    print(
        f"\n  TTFT, GenerateStream (gRPC) and streamed /v1/completions (HTTP, openai client) "
        f"from client processes vs engine.stream in the server, {pairs} interleaved triples, "
        f"{len(PROMPT)}-character prompt, medians (target <= 5 %):"
    )
    for size in ["tiny", *filter(None, sizes.split(","))]:
        model = (
            settings.model if size == "tiny" else str(build_untrained(size, tmp / f"llama-{size}"))
        )
        server = InProcessServer(settings.model_copy(update={"model": model, "http_port": 0}))
        try:
            tokens = len(server.running.service.engine.encode(PROMPT, None))
            grpc_t, http_t, direct_t = protocols_vs_direct_ttft(server, pairs)
        finally:
            server.stop()
        g, h = statistics.median(grpc_t), statistics.median(http_t)
        d = statistics.median(direct_t)
        print(
            f"    {size:<8} ({tokens} prompt tokens)  engine direct {d * 1000:7.2f} ms   "
            f"gRPC {g * 1000:7.2f} ms (+{100 * (g / d - 1):5.1f} %, {(g - d) * 1000:.2f} ms)   "
            f"HTTP {h * 1000:7.2f} ms (+{100 * (h / d - 1):5.1f} %, {(h - d) * 1000:.2f} ms)"
        )


if __name__ == "__main__":
    main()
