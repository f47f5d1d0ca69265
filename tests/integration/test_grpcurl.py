"""A real third-party client: grpcurl (Go, grpc-go) against the real server on loopback,
knowing nothing of the protos but what server reflection tells it: list, describe, health
Check and Watch, Generate, GenerateStream, Feedback, and the error statuses with their
messages. grpcurl comes from `scripts/install-ops-tools.sh` (`make test` runs it)."""

from __future__ import annotations

import json
import subprocess
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from tests.ops_tools import INSTALL_HINT, find_tool
from tests.support import InProcessServer, isolated_settings, serving

pytestmark = pytest.mark.kafka

SERVICE = "loraloop.v1.LoraLoop"
# grpcurl exits with 64 + the status code when the call fails
EXIT_INVALID_ARGUMENT, EXIT_DEADLINE_EXCEEDED, EXIT_NOT_FOUND = 64 + 3, 64 + 4, 64 + 5


@pytest.fixture(scope="module")
def grpcurl() -> str:
    path = find_tool("grpcurl")
    if path is None:
        pytest.skip(f"grpcurl is not installed: {INSTALL_HINT}")
    return path


@pytest.fixture(scope="module")
def server(
    kafka_bootstrap: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[InProcessServer]:
    settings = isolated_settings(
        kafka_bootstrap, tmp_path_factory.mktemp("grpcurl"), max_new_tokens=8
    )
    with serving(settings) as running:
        yield running


class Grpcurl:
    def __init__(self, path: str, target: str) -> None:
        self.path, self.target = path, target

    def __call__(
        self, *args: str, data: dict[str, Any] | None = None, max_time: float = 60
    ) -> subprocess.CompletedProcess[str]:
        command = [self.path, "-plaintext", "-format-error", "-max-time", f"{max_time:g}"]
        if data is not None:
            command += ["-d", json.dumps(data)]
        return subprocess.run(
            [*command, self.target, *args], capture_output=True, text=True, timeout=120
        )

    def ok(self, *args: str, data: dict[str, Any] | None = None) -> list[Any]:
        """The JSON messages of a call that must succeed."""
        result = self(*args, data=data)
        assert result.returncode == 0, (args, result.stdout, result.stderr)
        return messages(result.stdout)

    def refused(self, method: str, data: dict[str, Any], exit_code: int) -> str:
        """The status message of a call that must fail with the status of `exit_code`."""
        result = self(method, data=data)
        assert result.returncode == exit_code, (method, result.stdout, result.stderr)
        (error,) = messages(result.stderr)  # -format-error: {"code": ..., "message": ...}
        assert error["code"] == exit_code - 64, error
        return str(error["message"])


def messages(text: str) -> list[Any]:
    """The JSON objects grpcurl printed, one after another."""
    decoder, out, at = json.JSONDecoder(), [], 0
    while (at := _skip_space(text, at)) < len(text):
        value, at = decoder.raw_decode(text, at)
        out.append(value)
    return out


def _skip_space(text: str, at: int) -> int:
    while at < len(text) and text[at].isspace():
        at += 1
    return at


@pytest.fixture
def call(grpcurl: str, server: InProcessServer) -> Grpcurl:
    return Grpcurl(grpcurl, server.target)


def test_reflection_lists_and_describes_the_api(call: Grpcurl) -> None:
    listed = call("list")
    assert listed.returncode == 0, listed.stderr
    assert {SERVICE, "grpc.health.v1.Health", "grpc.reflection.v1alpha.ServerReflection"} <= set(
        listed.stdout.split()
    )
    methods = call("list", SERVICE)
    assert methods.returncode == 0, methods.stderr
    assert {f"{SERVICE}.{m}" for m in ("Generate", "GenerateStream", "Feedback")} <= set(
        methods.stdout.split()
    )
    described = call("describe", SERVICE)
    assert described.returncode == 0, described.stderr
    assert "returns ( stream .loraloop.v1.GenerateStreamResponse )" in described.stdout
    request = call("describe", "loraloop.v1.GenerateRequest")
    assert request.returncode == 0, request.stderr
    for fieldname in ("user_id", "prompt", "messages", ".loraloop.v1.SamplingParams sampling"):
        assert fieldname in request.stdout


def test_health_check_and_watch(call: Grpcurl) -> None:
    for service in ("", SERVICE):
        assert call.ok("grpc.health.v1.Health/Check", data={"service": service}) == [
            {"status": "SERVING"}
        ]
    # Watches ended by the client's deadline (-max-time) hold nothing on the server: 8 at
    # once took the first version's 6 executor threads for good, and a new user's Generate
    # (which resolves the user in a thread) then timed out
    with ThreadPoolExecutor(8) as pool:
        watch = {"service": SERVICE}
        watches = list(
            pool.map(
                lambda _: call("grpc.health.v1.Health/Watch", data=watch, max_time=1), range(8)
            )
        )
    for ended in watches:
        assert ended.returncode == EXIT_DEADLINE_EXCEEDED, (ended.stdout, ended.stderr)
        assert messages(ended.stdout) == [{"status": "SERVING"}]
        assert messages(ended.stderr)[0]["code"] == 4  # DEADLINE_EXCEEDED
    assert call.ok("grpc.health.v1.Health/Check", data={}) == [{"status": "SERVING"}]
    new_user = {"user_id": f"grpcurl.{uuid.uuid4().hex[:8]}", "prompt": "Hi"}
    start = time.perf_counter()
    result = call(f"{SERVICE}/Generate", data=new_user, max_time=10)
    assert result.returncode == 0, (result.stdout, result.stderr)
    print(
        f"\ngrpcurl: 8 Watches ended by -max-time, then a new user's Generate in "
        f"{time.perf_counter() - start:.2f} s (grpcurl's own start included)"
    )


def test_generate_stream_and_feedback(call: Grpcurl) -> None:
    request = {"user_id": "grpcurl.alice", "prompt": "How do I cook pasta?"}
    request["sampling"] = {"max_tokens": 6, "seed": 3}
    (reply,) = call.ok(f"{SERVICE}/Generate", data=request)
    assert reply["request_id"] and reply["finish_reason"] in {"stop", "length"}
    assert 0 < reply["usage"]["completion_tokens"] <= 6
    parts = call.ok(f"{SERVICE}/GenerateStream", data=request)
    *deltas, last = parts
    assert deltas and all(set(d) == {"delta"} for d in deltas)
    final = last["final"]
    assert final["text"] == "".join(d["delta"] for d in deltas) == reply["text"]  # same seed
    assert final["request_id"] and final["request_id"] != reply["request_id"]
    feedback = {"request_id": reply["request_id"], "user_id": "grpcurl.alice"}
    feedback["signals"] = {"thumbs": 1}
    (answer,) = call.ok(f"{SERVICE}/Feedback", data=feedback)
    assert isinstance(answer, dict)


def test_errors_are_statuses_with_messages_naming_the_field(call: Grpcurl) -> None:
    prompt = "Hello"
    message = call.refused(
        f"{SERVICE}/Generate",
        {"user_id": "alice", "prompt": prompt, "sampling": {"max_tokens": 100_000}},
        EXIT_INVALID_ARGUMENT,
    )
    assert "sampling.max_tokens" in message and "use 1..8" in message
    message = call.refused(
        f"{SERVICE}/Generate", {"user_id": "bad id", "prompt": prompt}, EXIT_INVALID_ARGUMENT
    )
    assert "user_id" in message
    message = call.refused(
        f"{SERVICE}/Feedback",
        {"user_id": "alice", "request_id": "never-issued", "signals": {"thumbs": 1}},
        EXIT_NOT_FOUND,
    )
    assert "request_id" in message and "Generate" in message
    # a field the API does not have is refused by grpcurl itself, from the reflected schema
    unknown = call(f"{SERVICE}/Generate", data={"user_id": "alice", "promt": prompt})
    assert unknown.returncode != 0 and "promt" in unknown.stderr


def test_the_install_script_pins_grpcurl() -> None:
    script = (Path(__file__).resolve().parents[2] / "scripts/install-ops-tools.sh").read_text()
    assert 'GRPCURL_VERSION="${GRPCURL_VERSION:-v1.9.4}"' in script
    assert "github.com/fullstorydev/grpcurl/cmd/grpcurl@${GRPCURL_VERSION}" in script
