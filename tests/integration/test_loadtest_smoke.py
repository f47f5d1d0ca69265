"""A seconds-long load test against the real server and learner (the CI smoke version).

The full runs are `python -m loadtests stack|capacity|compare` (loadtests/README.md).
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from loadtests import report
from loadtests.config import LoadConfig, check_loopback
from loadtests.generator import run_load
from loadtests.stack import events_lost
from loraloop.client import LoraLoopClient
from loraloop.core.kafka.admin import ensure_loraloop_topics
from loraloop.core.settings import Settings
from tests.support import InProcessServer, isolated_settings, wait_until

pytestmark = pytest.mark.kafka


@pytest.fixture(scope="module")
def served(
    kafka_bootstrap: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[Settings, InProcessServer]]:
    """The server in process and a learner on a thread, on topics of their own."""
    from loraloop.learner.loop import Learner

    settings = isolated_settings(
        kafka_bootstrap,
        tmp_path_factory.mktemp("load"),
        max_new_tokens=16,
        learning_rate=0.02,
        adapter_slots=4,
    )
    ensure_loraloop_topics(settings)
    server = InProcessServer(settings)
    learner = Learner(settings, max_users_per_step=8)
    learner.connect()
    stop = threading.Event()
    thread = threading.Thread(target=learner.run, args=(stop,), daemon=True)
    thread.start()
    try:
        yield settings, server
    finally:
        stop.set()
        thread.join(30)
        learner.close()
        server.stop()


def test_refuses_targets_off_this_machine() -> None:
    assert check_loopback("127.0.0.1:1") == "127.0.0.1:1"
    assert check_loopback("localhost:50051") == "localhost:50051"
    for target in ("8.8.8.8:50051", "10.1.2.3:1", "nohostport"):
        with pytest.raises(ValueError):
            LoadConfig(target=target, requests=1)


def test_load_with_feedback_then_adapters_are_served(served, tmp_path: Path) -> None:
    settings, server = served
    users = 6
    base = {"target": server.target, "users": users, "max_tokens": 8, "user_prefix": "smoke"}

    # Closed loop, a fixed number of sessions, half of them streamed (time to first token).
    first = run_load(
        LoadConfig(
            mode="closed", concurrency=4, requests=24, duration=None, stream_share=0.5, **base
        )
    )
    summary = report.write(first, tmp_path, "smoke")
    assert summary["sessions"] == summary["completed"] == 24
    assert summary["error_rate"] == 0 and summary["errors_by_code"] == {}
    assert summary["feedback"]["ok"] == summary["feedback"]["sent"] == 24
    lat, ttft = summary["latency_ms"], summary["ttft_ms"]
    assert 0 < lat["p50"] <= lat["p95"] <= lat["p99"] <= lat["max"]
    assert 0 < summary["streamed"] < 24 and 0 < ttft["p50"] <= ttft["max"] <= lat["max"]
    assert summary["requests_per_s"] > 0 and summary["tokens_per_s"] > 0
    assert 0 < summary["mean_completion_tokens"] <= 8
    assert summary["reward"]["trend"] and 0 <= summary["reward"]["mean"] <= 1
    written = json.loads((tmp_path / "smoke.json").read_text())
    assert written["completed"] == 24 and written["config"]["mode"] == "closed"
    assert (tmp_path / "smoke.png").stat().st_size > 10_000

    # Every interaction served reached Kafka.
    lost = events_lost(
        settings.kafka_bootstrap, settings.topic_interactions, first.served_request_ids
    )
    assert lost == {"served": 24, "in_kafka": 24, "lost": 0}

    # The learner turns the feedback into adapters that the server then serves.
    with LoraLoopClient(server.target, timeout=30) as client:
        wait_until(
            lambda: (
                sum(client.user_state(f"smoke-{i:04d}").adapter_version > 0 for i in range(users))
                == users
            ),
            60,
            "an adapter version for every user",
        )

    # Open loop (Poisson) for a fixed duration, with a ramp; six users but four adapter slots.
    second = run_load(
        LoadConfig(mode="open", rate=8, duration=2.5, ramp=0.5, stream_share=0.0, **base)
    )
    after = report.summarize(second)
    assert after["sessions"] >= 5 and after["completed"] == after["sessions"]
    assert after["issue_s"] <= 2.6 and after["elapsed_s"] < 2.5 + 30
    assert after["adapter_versions"]["share_with_adapter"] == 1.0
    assert after["adapter_versions"]["max_version"] >= 1
    assert after["adapter_versions"]["distinct_user_versions"] >= 1

    # Hard stop: what is still in flight when issuing ends is cancelled, not waited for.
    cut = run_load(LoadConfig(mode="closed", concurrency=4, duration=0.5, hard_stop=0.0, **base))
    codes = [c.code for c in cut.calls]
    assert codes.count("ABANDONED") >= 1 and set(codes) <= {"OK", "ABANDONED"}
    assert cut.elapsed < 0.5 + 2.0
