"""Limits of the real server over loopback: prompt size (characters, tokens, chat turns,
gRPC message bytes), concurrent generations (RESOURCE_EXHAUSTED beyond
max_concurrent_requests) and deadlines (DEADLINE_EXCEEDED for the client, the request
cancelled in the engine, its batch slot given to the next request).

Generations that must outlast a deadline or hold a place use temperature 10, where the
tiny model ends a response (samples end-of-sequence) about once in a thousand tokens; a
run that ends early anyway is retried with another seed. The deadline tests do not rely on
the engine being slow: their deadline is measured on the machine they run on (the time of
about a tenth of a long generation, at most 0.5 s), so a fast GPU gets a shorter one. Run
with `-s` for the figures.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from loraloop.core.gen.loraloop.v1 import api_pb2, api_pb2_grpc, common_pb2
from loraloop.core.settings import Settings
from tests.support import InProcessServer, isolated_settings, serving, wait_until

pytestmark = pytest.mark.kafka

S = grpc.StatusCode
LONG = 1000  # max_tokens of a generation meant to run until it is stopped
MAX_PROMPT_TOKENS = 64
MAX_PROMPT_CHARS = 20_000
MAX_MESSAGE_BYTES = 64 * 1024
CONCURRENT = 2
SEEDS = range(1, 9)  # tries for a long generation


@pytest.fixture(scope="module")
def served(
    kafka_bootstrap: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[Settings, InProcessServer]]:
    settings = isolated_settings(
        kafka_bootstrap,
        tmp_path_factory.mktemp("limits"),
        max_prompt_tokens=MAX_PROMPT_TOKENS,
        max_prompt_chars=MAX_PROMPT_CHARS,
        max_message_bytes=MAX_MESSAGE_BYTES,
        max_new_tokens=LONG,
        max_concurrent_requests=CONCURRENT,
        max_batch_size=1,  # one row: a request holds the batch until it ends or is cancelled
    )
    with serving(settings) as server:
        yield settings, server


@pytest.fixture(scope="module")
def stub(served) -> Iterator[api_pb2_grpc.LoraLoopStub]:
    with grpc.insecure_channel(served[1].target) as channel:
        yield api_pb2_grpc.LoraLoopStub(channel)


def request(user: str = "lim", max_tokens: int = 4, seed: int = 1, **fields: Any):
    sampling = common_pb2.SamplingParams(max_tokens=max_tokens, seed=seed, temperature=10.0)
    return api_pb2.GenerateRequest(user_id=user, sampling=sampling, **fields)


def refused(fn: Any, req: Any, **kwargs: Any) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as info:
        result = fn(req, **kwargs)
        if not hasattr(result, "request_id"):
            list(result)  # a stream: the status comes with its end
    return info.value.code(), info.value.details()


def short_deadline(stub) -> float:
    """A deadline a LONG generation cannot meet here: the time of LONG/10 tokens at the
    rate just measured (RPC and prefill included, so if anything longer), at most 0.5 s."""
    started = time.perf_counter()
    reply = stub.Generate(request("calibrate", 64, 1, prompt="Tell me"), timeout=120)
    per_token = (time.perf_counter() - started) / max(1, reply.usage.completion_tokens)
    return max(0.02, min(0.5, per_token * LONG / 10))


def idle(served) -> None:
    """Wait until nothing is admitted or running."""
    service = served[1].running.service
    wait_until(
        lambda: service.limit.in_flight == 0 and service.engine.running_rows == 0,
        30,
        "the server to go idle",
    )


# --- prompt size ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("label", "fields", "fragments"),
    [
        ("tokens", {"prompt": "word " * 200}, ["tokens", f"limit is {MAX_PROMPT_TOKENS}"]),
        (
            "characters",
            {"prompt": "x" * (MAX_PROMPT_CHARS + 1)},
            ["characters", f"limit is {MAX_PROMPT_CHARS}"],
        ),
        (
            "characters of all turns",
            {"messages": {"messages": [{"role": "user", "content": "y" * 8_000}] * 3}},
            ["24000 characters together", f"limit is {MAX_PROMPT_CHARS}"],
        ),
        (
            "turns",
            {"messages": {"messages": [{"role": "user", "content": "hi"}] * 1_001}},
            ["1001 entries", "limit is 1000"],
        ),
        (
            "message bytes",
            {"prompt": "\u00e9" * (MAX_MESSAGE_BYTES // 2)},  # 2 bytes each: just over
            ["larger than max", str(MAX_MESSAGE_BYTES)],
        ),
    ],
)
def test_oversized_prompts_are_resource_exhausted(
    stub, label: str, fields: dict[str, Any], fragments: list[str]
) -> None:
    for fn in (stub.Generate, stub.GenerateStream):
        code, details = refused(fn, request(**fields), timeout=30)
        assert code == S.RESOURCE_EXHAUSTED, (label, details)
        for fragment in fragments:
            assert fragment in details, (label, details)
    print(f"\n{label}: RESOURCE_EXHAUSTED {details!r}")


def test_prompts_at_the_limits_are_served(stub) -> None:
    at_chars = request(prompt="ab " * 10)  # well inside the token limit
    assert stub.Generate(at_chars, timeout=60).usage.prompt_tokens <= MAX_PROMPT_TOKENS
    code, details = refused(stub.Generate, request(prompt="x" * MAX_PROMPT_CHARS), timeout=30)
    # as many characters as allowed, so the refusal is about tokens, counted after encoding
    assert code == S.RESOURCE_EXHAUSTED and "tokens" in details


def test_default_limits() -> None:
    defaults = Settings()
    assert defaults.max_message_bytes == 4 * 2**20
    assert defaults.max_prompt_chars == 100_000
    assert defaults.max_concurrent_requests == 256


# --- concurrent requests ----------------------------------------------------------------


def test_requests_beyond_max_concurrent_are_refused(served, stub) -> None:
    service = served[1].running.service
    idle(served)
    outcome = None
    for seed in SEEDS:
        holders = [
            stub.GenerateStream(request(f"hold{i}", LONG, seed * 10 + i, prompt="Tell me"))
            for i in range(CONCURRENT)
        ]
        try:
            # both admitted: the first generating, the second waiting for the batch row
            wait_until(lambda: service.limit.in_flight == CONCURRENT, 30, "both holders in")
            next(holders[0])
            try:
                stub.Generate(request("extra", 4, prompt="hi"), timeout=30)
                outcome = None  # a holder ended early (end of sequence): try another seed
            except grpc.RpcError as err:
                outcome = (err.code(), err.details())
                stream_code, _ = refused(stub.GenerateStream, request("extra", 4, prompt="hi"))
                state = stub.GetUserState(api_pb2.GetUserStateRequest(user_id="extra"))
        finally:
            for call in holders:
                call.cancel()  # the client goes away: the engine drops the rows
        idle(served)
        if outcome is not None:
            break
    assert outcome is not None, "no holder outlived its first delta for any seed"
    code, details = outcome
    assert code == S.RESOURCE_EXHAUSTED and stream_code == S.RESOURCE_EXHAUSTED
    assert f"for {CONCURRENT} requests" in details and "retry with backoff" in details
    assert "LORALOOP_MAX_CONCURRENT_REQUESTS" in details
    assert state.user_id == "extra"  # other RPCs are not limited
    after = stub.Generate(request("extra", 4, prompt="hi"), timeout=60)  # places are free
    assert after.usage.completion_tokens > 0
    print(
        f"\nmax_concurrent_requests={CONCURRENT}: refused {service.limit.refused}, "
        f"peak in flight {service.limit.peak}; {details!r}"
    )


# --- deadlines --------------------------------------------------------------------------


def test_deadline_exceeded_cancels_the_generation_and_frees_its_slot(served, stub) -> None:
    engine = served[1].running.service.engine
    idle(served)
    deadline = short_deadline(stub)
    for seed in SEEDS:
        cancelled, tokens, steps = engine.cancelled, engine.cancelled_tokens, engine.steps
        long = request("late", LONG, seed, prompt="Tell me a long story")
        # with one batch row, this one waits for the long one's slot
        waiting = stub.Generate.future(request("next", 4, seed, prompt="hi"), timeout=120)
        try:
            stub.Generate(long, timeout=deadline)
        except grpc.RpcError as err:
            assert err.code() == S.DEADLINE_EXCEEDED, err.details()
            break
        finally:
            assert waiting.result().usage.completion_tokens > 0  # it got the slot
    else:
        pytest.fail(f"every long generation ended within {deadline:.3f} s (end of sequence)")
    idle(served)
    wait_until(lambda: engine.cancelled > cancelled, 30, "the engine to cancel the request")
    produced = engine.cancelled_tokens - tokens
    assert 0 <= produced < LONG  # stopped early, not run to max_tokens
    assert engine.steps - steps < LONG
    print(
        f"\nGenerate(max_tokens={LONG}) with a {deadline:.3f} s deadline: DEADLINE_EXCEEDED; "
        f"the engine dropped it after {produced} tokens ({engine.steps - steps} decoding steps "
        "for it and the request waiting for its slot, which then ran)"
    )


def test_stream_deadline_cancels_the_generation(served, stub) -> None:
    engine = served[1].running.service.engine
    idle(served)
    deadline = short_deadline(stub)
    for seed in SEEDS:
        cancelled, tokens = engine.cancelled, engine.cancelled_tokens
        deltas = 0
        long = request("late", LONG, seed, prompt="Tell me")
        stream = stub.GenerateStream(long, timeout=deadline)
        try:
            for part in stream:
                deltas += not part.HasField("final")
        except grpc.RpcError as err:
            assert err.code() == S.DEADLINE_EXCEEDED, err.details()
            break
    else:
        pytest.fail(f"every long stream ended within {deadline:.3f} s (end of sequence)")
    idle(served)
    wait_until(lambda: engine.cancelled > cancelled, 30, "the engine to cancel the stream")
    produced = engine.cancelled_tokens - tokens
    assert produced < LONG
    print(
        f"\nGenerateStream with a {deadline:.3f} s deadline: {deltas} deltas, then "
        f"DEADLINE_EXCEEDED; {produced} tokens"
    )


def test_server_healthy_after_the_limits(served, stub) -> None:
    health = health_pb2_grpc.HealthStub(grpc.insecure_channel(served[1].target))
    answer = health.Check(health_pb2.HealthCheckRequest(service=""), timeout=10)
    assert answer.status == health_pb2.HealthCheckResponse.SERVING
    reply = stub.Generate(request("after", 4, prompt="hello"), timeout=60)
    assert reply.usage.completion_tokens > 0
