"""Health Watch streams and draining on SIGTERM, against the real server (in process, and
as a `loraloop serve` process).

- Watch streams, open or cancelled, hold nothing the API needs: the first version ran
  grpc's synchronous health servicer on the asyncio server, where each Watch took one of
  the default executor's threads (the ones `asyncio.to_thread` uses) for good, so 6
  Watches starved a new user's Generate and DeleteUser, and one kept SIGTERM from ever
  ending the process.
- On SIGTERM the server turns health NOT_SERVING at once (Check and every Watch), keeps
  answering for `drain_seconds`, then refuses new calls and stops.

`pytest tests/integration/test_health_drain.py -s` prints the figures.
"""

from __future__ import annotations

import json
import signal
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from loraloop.core.gen.loraloop.v1 import api_pb2, api_pb2_grpc, common_pb2
from loraloop.core.kafka.admin import ensure_loraloop_topics
from tests.support import Process, isolated_settings, serving, wait_until

pytestmark = pytest.mark.kafka

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
READY = r"listening on [\d.]+:(\d+)"


def _generate(
    stub: api_pb2_grpc.LoraLoopStub, user: str, timeout: float
) -> api_pb2.GenerateResponse:
    request = api_pb2.GenerateRequest(
        user_id=user, prompt="How do I cook rice?", sampling=common_pb2.SamplingParams(max_tokens=4)
    )
    return stub.Generate(request, timeout=timeout)


def test_cancelled_watch_streams_leave_the_server_responsive(
    kafka_bootstrap: str, tmp_path: Path
) -> None:
    settings = isolated_settings(kafka_bootstrap, tmp_path, max_new_tokens=8)
    with serving(settings) as server, grpc.insecure_channel(server.target) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        streams = []
        for i in range(20):
            service = "" if i % 2 else "loraloop.v1.LoraLoop"
            stream = health.Watch(health_pb2.HealthCheckRequest(service=service), timeout=30)
            streams.append(stream)
            assert next(stream).status == SERVING, f"Watch #{i + 1} got no first status"
        for stream in streams:
            stream.cancel()
        stub = api_pb2_grpc.LoraLoopStub(channel)
        user = f"fresh-{uuid.uuid4().hex[:8]}"  # unknown to the registry: resolved in a thread
        start = time.perf_counter()
        reply = _generate(stub, user, timeout=10)
        generate_s = time.perf_counter() - start
        assert reply.request_id and reply.adapter_version == 0
        start = time.perf_counter()
        # answered (OK) in time is what counts here: `deleted` says whether it had anything
        stub.DeleteUser(api_pb2.DeleteUserRequest(user_id=user), timeout=10)
        delete_s = time.perf_counter() - start
        check = health.Check(health_pb2.HealthCheckRequest(), timeout=5)
        assert check.status == SERVING
        print(
            "\n20 Watch streams opened and cancelled: new user's Generate "
            f"{generate_s * 1000:.0f} ms, DeleteUser {delete_s * 1000:.0f} ms"
        )


@dataclass
class Watched:
    """What one Watch stream received, with times relative to `origin`."""

    origin: float = 0.0
    statuses: list[tuple[float, int]] = field(default_factory=list)
    ended_at: float | None = None
    ended_with: grpc.StatusCode | None = None


def _watch(channel: grpc.Channel, seen: Watched) -> threading.Thread:
    def run() -> None:
        stream = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest())
        try:
            for response in stream:
                seen.statuses.append((time.monotonic() - seen.origin, response.status))
            seen.ended_with = grpc.StatusCode.OK
        except grpc.RpcError as exc:
            seen.ended_with = exc.code()
        seen.ended_at = time.monotonic() - seen.origin

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def test_sigterm_drains_with_health_not_serving_then_exits(
    kafka_bootstrap: str, tmp_path: Path
) -> None:
    drain, grace, margin = 3.0, 2.0, 8.0
    settings = isolated_settings(
        kafka_bootstrap,
        tmp_path,
        max_new_tokens=8,
        drain_seconds=drain,
        grace_seconds=grace,
        event_drain_seconds=1.0,
        log_json=True,
    )
    ensure_loraloop_topics(settings)
    server = Process(["serve"], settings, ready=READY)
    assert server.match is not None
    target = f"127.0.0.1:{server.match.group(1)}"
    watch_channel = grpc.insecure_channel(target)
    channel = grpc.insecure_channel(target)
    try:
        health = health_pb2_grpc.HealthStub(channel)
        stub = api_pb2_grpc.LoraLoopStub(channel)
        _generate(stub, "before-drain", timeout=30)  # warm: the first call loads nothing later
        # a Watch cancelled before the SIGTERM (it held a thread for good in the first version)
        cancelled = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest())
        assert next(cancelled).status == SERVING
        cancelled.cancel()
        seen = Watched(origin=time.monotonic())
        watcher = _watch(watch_channel, seen)
        deadline = time.monotonic() + 10
        while not seen.statuses and time.monotonic() < deadline:
            time.sleep(0.01)
        assert seen.statuses and seen.statuses[0][1] == SERVING

        sigterm = time.monotonic()
        seen.origin = sigterm  # later statuses are timed from the SIGTERM
        seen.statuses = []
        server.proc.send_signal(signal.SIGTERM)
        not_serving_at: float | None = None
        served_while_not_serving = 0
        refused_at: float | None = None
        refused_code: grpc.StatusCode | None = None
        while refused_at is None and time.monotonic() - sigterm < drain + grace + margin:
            try:
                status = health.Check(health_pb2.HealthCheckRequest(), timeout=2).status
                if status == NOT_SERVING and not_serving_at is None:
                    not_serving_at = time.monotonic() - sigterm
                _generate(stub, "during-drain", timeout=5)
                if not_serving_at is not None:
                    served_while_not_serving += 1
            except grpc.RpcError as exc:
                refused_at, refused_code = time.monotonic() - sigterm, exc.code()
            time.sleep(0.05)
        try:
            exit_code = server.proc.wait(drain + grace + margin - (time.monotonic() - sigterm))
        except Exception:
            exit_code = None
        exited_at = time.monotonic() - sigterm
        watcher.join(5)
        print(
            f"\nSIGTERM with an open Watch (drain {drain:.0f} s, grace {grace:.0f} s): "
            f"Check NOT_SERVING after {_ms(not_serving_at)}, Watch NOT_SERVING after "
            f"{_ms(next((t for t, s in seen.statuses if s == NOT_SERVING), None))}, "
            f"{served_while_not_serving} Generate OK while NOT_SERVING, first refusal "
            f"({refused_code.name if refused_code else '-'}) after {_ms(refused_at)}, "
            f"Watch ended ({seen.ended_with.name if seen.ended_with else '-'}) after "
            f"{_ms(seen.ended_at)}, exit {exit_code} after {exited_at:.2f} s"
        )
        assert exit_code == 0, (
            f"`loraloop serve` did not exit within {drain + grace + margin:.0f} s of SIGTERM "
            f"with an open Watch:\n{server.output}"
        )
        assert not_serving_at is not None and not_serving_at < 1.0, "health not NOT_SERVING first"
        assert served_while_not_serving >= 1, "Generate was not answered during the drain window"
        assert refused_at is not None and refused_at >= drain - 0.5, (
            "calls refused before the drain"
        )
        assert refused_code == grpc.StatusCode.UNAVAILABLE
        # the open Watch saw NOT_SERVING, and only then ended
        assert [s for _, s in seen.statuses][-1:] == [NOT_SERVING]
        assert seen.ended_at is not None and seen.statuses[-1][0] <= seen.ended_at
        assert seen.statuses[-1][0] < 1.0
        # access-log lines are on at the default log level (WARNING); successful health
        # checks (every few seconds from probes) only at DEBUG
        access = [
            json.loads(line)
            for line in server.lines
            if line.startswith("{") and '"logger": "loraloop.access"' in line
        ]
        assert any(a["rpc"] == "Generate" and a["code"] == "OK" for a in access), server.output
        assert not any(a["rpc"] in ("Check", "Watch") and a["code"] == "OK" for a in access)
    finally:
        channel.close()
        watch_channel.close()
        if server.proc.poll() is None:
            server.kill()


def _ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1000:.0f} ms"


@pytest.mark.parametrize("signals", ["SIGINT", "SIGTERM SIGTERM"])
def test_sigint_or_a_second_signal_skips_the_drain(
    kafka_bootstrap: str, tmp_path: Path, signals: str
) -> None:
    """Ctrl-C at a terminal is a person waiting, not a load balancer: no drain window; and
    a second signal ends one under way."""
    drain = 60.0
    settings = isolated_settings(
        kafka_bootstrap, tmp_path, drain_seconds=drain, grace_seconds=1.0, event_drain_seconds=1.0
    )
    ensure_loraloop_topics(settings)
    server = Process(["serve"], settings, ready=READY)
    assert server.match is not None
    try:
        with grpc.insecure_channel(f"127.0.0.1:{server.match.group(1)}") as channel:
            health = health_pb2_grpc.HealthStub(channel)
            first, *more = (getattr(signal, name) for name in signals.split())
            start = time.monotonic()
            server.proc.send_signal(first)
            if more:  # draining: NOT_SERVING, still answering
                request = health_pb2.HealthCheckRequest()
                wait_until(
                    lambda: health.Check(request, timeout=5).status == NOT_SERVING,
                    5,
                    "health NOT_SERVING after the first SIGTERM",
                )
                server.proc.send_signal(more[0])
            exit_code = server.proc.wait(20)
            took = time.monotonic() - start
        print(f"\n{signals} with drain_seconds={drain:.0f}: exit {exit_code} after {took:.2f} s")
        assert exit_code == 0 and took < 15
    finally:
        if server.proc.poll() is None:
            server.kill()
