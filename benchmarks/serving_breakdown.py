"""Where a Generate call's time goes: engine wait + prefill, decode, and everything else.

    python benchmarks/serving_breakdown.py [--concurrency 1,4,8,16] [--requests 60]

Starts a Kafka broker and the real gRPC server in this process with its engine wrapped
in a timer, then drives it with the load generator (closed loop, unary Generate,
max_tokens 32) at each concurrency. Per request, from the engine's own stream:

- wait + prefill: engine submit -> first token (at concurrency 1 there is no queue, so
  that row is the prefill of one prompt plus one sampling step);
- decode: first -> last token;
- outside the engine: the client's latency minus the engine's time (gRPC, protobuf,
  validation, tokenizing the prompt, publishing the event, the asyncio hops, and this
  process's client, which shares the GIL with the server).

Figures are medians; ratios are against concurrency 1 in the same run.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import AsyncIterator
from pathlib import Path

from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from loadtests.config import LoadConfig
from loadtests.generator import run_load
from loraloop.core.kafka.admin import ensure_loraloop_topics
from loraloop.core.settings import Settings
from loraloop.devtools.kafka_broker import KafkaBroker
from loraloop.devtools.tiny_model import ensure_tiny_model
from loraloop.service.engines.protocol import Engine, GenerationRequest, TokenChunk


class TimedEngine(Engine):
    """Delegates to the real engine and keeps (submit, first token, done, tokens) per id."""

    def __init__(self, inner: Engine) -> None:
        self.inner = inner
        self.model_id = inner.model_id
        self.times: dict[str, tuple[float, float, float, int]] = {}

    async def start(self) -> None:
        await self.inner.start()
        self.model_id = self.inner.model_id

    async def stop(self) -> None:
        await self.inner.stop()

    def encode(self, prompt: str | None, messages: list[tuple[str, str]] | None) -> list[int]:
        return self.inner.encode(prompt, messages)

    def finish_reason(self, token_ids: list[int], max_tokens: int) -> str:
        return self.inner.finish_reason(token_ids, max_tokens)

    def drop_user(self, user_id: str) -> None:
        self.inner.drop_user(user_id)

    async def stream(self, request: GenerationRequest) -> AsyncIterator[TokenChunk]:
        submit = time.monotonic()
        first = None
        tokens = 0
        async for chunk in self.inner.stream(request):
            if first is None:
                first = time.monotonic()
            tokens += len(chunk.token_ids)
            yield chunk
        done = time.monotonic()
        self.times[request.request_id] = (submit, first or done, done, tokens)


def main() -> int:
    from loraloop.service.engines.factory import build_engine
    from loraloop.service.server import create_server

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--concurrency", default="1,4,8,16")
    parser.add_argument("--requests", type=int, default=60)
    parser.add_argument("--max-tokens", type=int, default=32)
    ns = parser.parse_args()
    console = Console(width=None if sys.stdout.isatty() else 140)
    tmp = Path(tempfile.mkdtemp(prefix="serving-breakdown-"))
    rows = []
    with KafkaBroker(data_dir=tmp / "kafka", log_level="WARN") as broker:
        settings = Settings(
            model=str(ensure_tiny_model(progress=False)),
            kafka_bootstrap=broker.bootstrap,
            port=0,
            adapter_store=tmp / "a",
        )
        ensure_loraloop_topics(settings)
        engine = TimedEngine(build_engine(settings))
        loop = asyncio.new_event_loop()
        threading.Thread(target=loop.run_forever, daemon=True).start()
        running = asyncio.run_coroutine_threadsafe(create_server(settings, engine), loop).result()
        target = f"127.0.0.1:{running.port}"
        try:
            fields = {
                "target": target,
                "mode": "closed",
                "duration": None,
                "users": 16,
                "max_tokens": ns.max_tokens,
                "stream_share": 0.0,
                "feedback": False,
            }
            run_load(LoadConfig(concurrency=2, requests=8, **fields))  # warm up
            for c in [int(x) for x in ns.concurrency.split(",")]:
                result = run_load(LoadConfig(concurrency=c, requests=ns.requests, **fields))
                parts = []
                for call in result.generations:
                    if call.code != "OK" or call.request_id not in engine.times:
                        continue
                    submit, first, done, tokens = engine.times[call.request_id]
                    parts.append(
                        (
                            call.latency,
                            first - submit,
                            done - first,
                            call.latency - (done - submit),
                            (done - first) / max(1, tokens - 1),
                            tokens,
                        )
                    )
                med = [statistics.median(p[i] for p in parts) for i in range(6)]
                rows.append((c, len(parts), result.elapsed, *med))
        finally:
            asyncio.run_coroutine_threadsafe(running.stop(1.0, drain=0), loop).result(60)
            loop.call_soon_threadsafe(loop.stop)
    base = rows[0]
    t = Table(title=f"Generate time breakdown (medians, ms), max_tokens {ns.max_tokens}")
    for col in (
        "concurrency",
        "requests/s",
        "latency",
        "wait + prefill",
        "decode",
        "per token",
        "outside engine",
        "tokens",
        "latency vs c=1",
    ):
        t.add_column(col, justify="right")
    for c, n, elapsed, lat, wait, dec, outside, per_tok, toks in rows:
        t.add_row(
            str(c),
            f"{n / elapsed:.1f}",
            f"{lat * 1e3:.0f}",
            f"{wait * 1e3:.0f}",
            f"{dec * 1e3:.0f}",
            f"{per_tok * 1e3:.1f}",
            f"{outside * 1e3:.0f}",
            f"{toks:.0f}",
            f"{lat / base[3]:.2f}x",
        )
    console.print(t)
    return 0


if __name__ == "__main__":
    sys.exit(main())
