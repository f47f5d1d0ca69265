"""Serving overheads through a real Kafka broker and the real gRPC server (hf engine, tiny
model): hot-swap latency, the cost of event logging, and the gRPC layer's share of TTFT.

- hot swap: a new adapter version is written to the store and its AdapterUpdated published
  to Kafka; clock stops at the first Generate reply that reports that version (a client
  keeps asking, max_tokens=1). Target p95 <= 250 ms.
- event logging: time spent building, serialising and queueing the Interaction event of a
  Generate (the server's `_response`, which also builds the reply). Target p99 <= 1 ms.
- gRPC TTFT: time to the first streamed token through GenerateStream vs `engine.stream` on
  the server's own loop, same prompts, interleaved. Target <= 5 % more.

    python benchmarks/bench_serving_overheads.py      # starts its own broker; ~2 minutes
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from core.adapter_store import AdapterStore
from core.gen.loraloop.v1 import events_pb2
from core.kafka.broker import KafkaBroker, ensure_loraloop_topics
from core.multi_lora import LoRAWeights
from core.peft_format import to_peft_files
from loraloop.client import LoraLoopClient
from service.engines.base import GenerationRequest
from tests.support import InProcessServer, isolated_settings


def ms(values: list[float], q: float) -> float:
    return float(np.percentile(np.array(values) * 1000, q))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--swaps", type=int, default=30)
    parser.add_argument("--requests", type=int, default=200)
    args = parser.parse_args()
    from kafka import KafkaProducer

    tmp = Path(tempfile.mkdtemp(prefix="bench-serving-"))
    broker = KafkaBroker(data_dir=tmp / "kafka")
    broker.start(timeout=180)
    server = None
    try:
        settings = isolated_settings(broker.bootstrap, tmp, max_new_tokens=32)
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

        # --- gRPC vs direct TTFT ------------------------------------------------------------
        ids = engine.encode("What should I see in Tokyo?", None)

        async def direct_ttft() -> float:
            req = GenerationRequest("direct", ids, None, 8, temperature=0.0)
            start = time.perf_counter()
            async for _ in engine.stream(req):
                return time.perf_counter() - start
            return float("nan")

        grpc_t, direct_t = [], []
        with LoraLoopClient(server.target, timeout=60) as client:
            for i in range(args.requests // 2):
                start = time.perf_counter()
                for _ in client.stream(
                    "ttft", "What should I see in Tokyo?", max_tokens=8, temperature=0.0
                ):
                    grpc_t.append(time.perf_counter() - start)
                    break
                fut = asyncio.run_coroutine_threadsafe(direct_ttft(), server.loop)
                direct_t.append(fut.result(60))
                del i

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
                    "swapper", version, to_peft_files(w, "tiny", settings.lora_targets)
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
        g, d = statistics.median(grpc_t), statistics.median(direct_t)
        print(
            f"  TTFT median, {len(grpc_t)} interleaved pairs: gRPC {g * 1000:.2f} ms, engine "
            f"direct {d * 1000:.2f} ms -> gRPC adds {100 * (g / d - 1):.1f} % "
            f"({(g - d) * 1000:.2f} ms)   (target <= 5 %)"
        )
    finally:
        if server is not None:
            server.stop()
        broker.stop()


if __name__ == "__main__":
    main()
