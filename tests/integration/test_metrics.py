"""Operators' view through real tools: `loraloop serve` and `loraloop learn` run as
processes on the session broker, real traffic goes through them, and then

- their /metrics endpoints have the expected series with plausible values,
- `promtool check metrics` accepts both scrapes,
- a real Prometheus server on loopback scrapes both and answers PromQL,
- SIGTERM drains the server and flushes every accepted event to Kafka.
"""

from __future__ import annotations

import json
import re
import subprocess
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from prometheus_client.parser import text_string_to_metric_families

from loraloop.client import LoraLoopClient
from loraloop.core.kafka.admin import ensure_loraloop_topics
from loraloop.core.settings import Settings
from tests.ops_tools import INSTALL_HINT, find_tool, free_port
from tests.support import Process, isolated_settings, read_topic, wait_until

pytestmark = pytest.mark.kafka
PROMPT = "How do I cook pasta?"
GRPC_SERVICE = "loraloop.v1.LoraLoop"


@dataclass
class Stack:
    settings: Settings
    server: Process
    learner: Process
    server_metrics: str  # host:port
    learner_metrics: str
    generated: int  # successful Generate/GenerateStream calls


def _metrics_address(proc: Process, who: str) -> str:
    pattern = re.compile(rf"{who} metrics on ([\d.]+:\d+)")
    for line in proc.lines:
        if m := pattern.search(line):
            return m.group(1)
    raise AssertionError(f"`loraloop {proc.name}` did not report its metrics port:\n{proc.output}")


@pytest.fixture(scope="module")
def stack(kafka_bootstrap: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    tmp = tmp_path_factory.mktemp("metrics")
    settings = isolated_settings(
        kafka_bootstrap,
        tmp,
        learning_rate=0.02,
        server_metrics_port=0,
        learner_metrics_port=0,
        log_json=True,
    )
    ensure_loraloop_topics(settings)
    # -v: INFO, so the JSON access-log lines are written too
    server = Process(["-v", "serve"], settings, ready=r"listening on [\d.]+:(\d+)")
    learner = None
    try:
        learner = Process(["learn"], settings, ready=r"learner consuming")
        assert server.match is not None
        with LoraLoopClient(f"127.0.0.1:{server.match.group(1)}", timeout=60) as client:
            client.wait_ready()
            alice = client.generate("alice", PROMPT, max_tokens=8, seed=1)
            bob = client.generate("bob", PROMPT, max_tokens=8, seed=2)
            final = [part for part in client.stream("carol", PROMPT, max_tokens=6, seed=3)][-1]
            assert not isinstance(final, str)
            with pytest.raises(grpc.RpcError) as err:
                client.generate("", PROMPT, max_tokens=4)
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert client.feedback(alice.request_id, "alice", thumbs=1, accepted=True)
            assert client.feedback(bob.request_id, "bob", thumbs=-1)
            assert client.feedback(final.request_id, "carol", thumbs=1)
            wait_until(lambda: client.user_state("alice").adapter_version >= 1, 60, "alice v1")
            # served with the version just published: a hot-swap and an adapter load
            assert client.generate("alice", PROMPT, max_tokens=4).adapter_version >= 1
        yield Stack(
            settings,
            server,
            learner,
            _metrics_address(server, "server"),
            _metrics_address(learner, "learner"),
            generated=4,
        )
    finally:
        for proc in (learner, server):
            if proc is not None and proc.proc.poll() is None:
                assert proc.stop() == 0, proc.output


def scrape(address: str) -> str:
    with urllib.request.urlopen(f"http://{address}/metrics", timeout=10) as response:
        return response.read().decode()


def samples(text: str) -> dict[str, list[tuple[dict[str, str], float]]]:
    """Sample name -> [(labels, value)] of one scrape."""
    out: dict[str, list[tuple[dict[str, str], float]]] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out.setdefault(s.name, []).append((s.labels, s.value))
    return out


def value(found: dict, name: str, **labels: str) -> float:
    """The sum of `name`'s samples whose labels include `labels`."""
    assert name in found, f"{name} is not exported; exported: {sorted(found)}"
    return sum(v for lab, v in found[name] if labels.items() <= lab.items())


def test_server_metrics_after_traffic(stack: Stack) -> None:
    m = samples(scrape(stack.server_metrics))
    ok = value(m, "loraloop_server_requests_total", service=GRPC_SERVICE, code="OK")
    assert value(m, "loraloop_server_requests_total", method="Generate", code="OK") >= 3
    assert value(m, "loraloop_server_requests_total", method="GenerateStream", code="OK") == 1
    assert value(m, "loraloop_server_requests_total", method="Feedback", code="OK") == 3
    assert value(m, "loraloop_server_requests_total", code="INVALID_ARGUMENT") == 1
    assert ok >= 7  # Generate x3, stream, feedback x3, user state polls
    durations = value(m, "loraloop_server_request_duration_seconds_count", method="Generate")
    assert durations == value(m, "loraloop_server_requests_total", method="Generate")
    assert 0 < value(m, "loraloop_server_request_duration_seconds_sum", method="Generate") < 120
    assert value(m, "loraloop_server_requests_in_flight", method="Generate") == 0
    # the engine: every served request had a first token, a batch, tokens
    assert value(m, "loraloop_server_time_to_first_token_seconds_count") == stack.generated
    assert 0 < value(m, "loraloop_server_time_to_first_token_seconds_sum") < 60
    assert value(m, "loraloop_server_batch_size_count") >= 1
    assert stack.generated <= value(m, "loraloop_server_generated_tokens_total") <= 8 + 8 + 6 + 4
    assert value(m, "loraloop_server_prompt_tokens_total") > 0
    # alice's new version: loaded once into a slot, hot-swapped, applied while following
    assert value(m, "loraloop_server_adapter_cache_misses_total", tier="engine") >= 1
    assert value(m, "loraloop_server_adapter_loads_total", result="ok") >= 1
    assert value(m, "loraloop_server_adapter_load_duration_seconds_count") >= 1
    assert value(m, "loraloop_server_adapters_resident") >= 1
    assert value(m, "loraloop_server_adapter_swap_seconds_count") >= 1
    assert 0 <= value(m, "loraloop_server_adapter_swap_seconds_sum") < 120
    assert value(m, "loraloop_server_adapter_staleness_seconds_count") >= 1
    assert value(m, "loraloop_server_adapter_updates_total") >= 1
    assert value(m, "loraloop_server_adapter_view_caught_up") == 1
    # events: 4 interactions + 3 feedback, none dropped, the queue drained
    assert value(m, "loraloop_server_events_accepted_total") == stack.generated + 3
    assert value(m, "loraloop_server_events_dropped_total") == 0
    assert value(m, "loraloop_server_event_queue_capacity") == stack.settings.event_queue_size
    assert value(m, "loraloop_server_kafka_producer_connected") == 1
    assert value(m, "loraloop_server_info", model=stack.settings.model) == 1


def test_learner_metrics_after_traffic(stack: Stack) -> None:
    def learnt() -> bool:
        m = samples(scrape(stack.learner_metrics))
        return value(m, "loraloop_learner_samples_total") >= 3

    wait_until(learnt, 60, "the learner to learn from all three samples")
    m = samples(scrape(stack.learner_metrics))
    assert value(m, "loraloop_learner_updates_total") >= 1
    assert value(m, "loraloop_learner_versions_written_total") >= 3  # alice, bob, carol
    assert value(m, "loraloop_learner_reward_count", algorithm="reinforce") >= 3
    assert -1 <= value(m, "loraloop_learner_reward_mean", algorithm="reinforce") <= 1
    assert value(m, "loraloop_learner_reward_bucket", le="1.0") == value(
        m, "loraloop_learner_reward_count"
    )
    assert value(m, "loraloop_learner_kl_count", algorithm="reinforce") >= 3
    assert value(m, "loraloop_learner_grad_norm_count", algorithm="reinforce") >= 3
    assert value(m, "loraloop_learner_update_duration_seconds_count") >= 1
    assert 0 < value(m, "loraloop_learner_update_duration_seconds_sum") < 60
    assert value(m, "loraloop_learner_last_update_timestamp_seconds") > time.time() - 300
    assert value(m, "loraloop_learner_records_malformed_total") == 0
    assert value(m, "loraloop_learner_rollbacks_total") >= 0
    assert "loraloop_learner_samples_skipped_total" in m

    # lag: one series per assigned partition of the three topics, all caught up by now
    def caught_up() -> bool:
        lag = samples(scrape(stack.learner_metrics)).get("loraloop_learner_consumer_lag", [])
        return len(lag) == 3 * stack.settings.topic_partitions and all(v == 0 for _, v in lag)

    wait_until(caught_up, 30, "consumer lag 0 on every partition")
    topics = {
        lab["topic"]
        for lab, _ in samples(scrape(stack.learner_metrics))["loraloop_learner_consumer_lag"]
    }
    assert topics == {
        stack.settings.topic_interactions,
        stack.settings.topic_feedback,
        stack.settings.topic_adapter_updates,
    }


def test_promtool_accepts_both_scrapes(stack: Stack, tmp_path: Path) -> None:
    promtool = find_tool("promtool")
    if promtool is None:
        pytest.skip(f"promtool is not installed (Debian package prometheus): {INSTALL_HINT}")
    for address in (stack.server_metrics, stack.learner_metrics):
        text = scrape(address)
        result = subprocess.run(
            [promtool, "check", "metrics"], input=text, capture_output=True, text=True
        )
        assert result.returncode == 0, result.stdout + result.stderr
        assert result.stdout.strip() == "" and result.stderr.strip() == "", result


def _query(base: str, promql: str) -> list[dict]:
    url = f"{base}/api/v1/query?" + urllib.parse.urlencode({"query": promql})
    with urllib.request.urlopen(url, timeout=5) as response:
        body = json.load(response)
    assert body["status"] == "success", body
    return body["data"]["result"]


def test_prometheus_scrapes_both_and_answers_promql(stack: Stack, tmp_path: Path) -> None:
    prometheus = find_tool("prometheus")
    if prometheus is None:
        pytest.skip(f"the prometheus server is not installed (Debian package): {INSTALL_HINT}")
    config = tmp_path / "prometheus.yml"
    config.write_text(
        "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nscrape_configs:\n"
        f"  - job_name: loraloop-server\n    static_configs:\n"
        f"      - targets: ['{stack.server_metrics}']\n"
        f"  - job_name: loraloop-learner\n    static_configs:\n"
        f"      - targets: ['{stack.learner_metrics}']\n"
    )
    port = free_port()
    proc = subprocess.Popen(
        [
            prometheus,
            f"--config.file={config}",
            f"--storage.tsdb.path={tmp_path / 'tsdb'}",
            f"--web.listen-address=127.0.0.1:{port}",
        ],
        stdout=subprocess.DEVNULL,
        stderr=(tmp_path / "prometheus.log").open("w"),
    )
    base = f"http://127.0.0.1:{port}"
    try:

        def answers() -> bool:
            try:
                up = _query(base, "up")
                versions = _query(base, "sum(loraloop_learner_versions_written_total)")
            except OSError:
                return False
            return (
                len(up) == 2
                and all(r["value"][1] == "1" for r in up)
                and bool(versions)
                and float(versions[0]["value"][1]) >= 1
            )

        wait_until(answers, 40, "Prometheus to scrape both processes")
        by_code = _query(
            base, 'sum by (method, code) (loraloop_server_requests_total{method=~"Generate.*"})'
        )
        answer = {
            f"{r['metric']['method']} {r['metric']['code']}": float(r["value"][1]) for r in by_code
        }
        print(f"PromQL sum by (method, code) (loraloop_server_requests_total): {answer}")
        assert answer["Generate OK"] >= 3 and answer["Generate INVALID_ARGUMENT"] == 1
        assert answer["GenerateStream OK"] == 1
        up = {r["metric"]["job"]: r["value"][1] for r in _query(base, "up")}
        assert up == {"loraloop-server": "1", "loraloop-learner": "1"}
    finally:
        proc.terminate()
        proc.wait(20)


def test_sigterm_drains_and_flushes_every_event(stack: Stack) -> None:
    accepted = value(samples(scrape(stack.server_metrics)), "loraloop_server_events_accepted_total")
    assert stack.server.stop() == 0, stack.server.output
    interactions = read_topic(stack.settings.kafka_bootstrap, stack.settings.topic_interactions)
    feedback = read_topic(stack.settings.kafka_bootstrap, stack.settings.topic_feedback)
    assert len(interactions) + len(feedback) == accepted == stack.generated + 3
    # JSON log lines, with the request_id and user_id of each call
    logs = [json.loads(line) for line in stack.server.lines if line.startswith("{")]
    access = [e for e in logs if e.get("rpc") == "Generate" and e.get("user_id") == "alice"]
    assert access and all(e["request_id"] and e["code"] == "OK" for e in access), logs[-5:]
    served = {e.get("request_id") for e in logs if str(e.get("rpc")).startswith("Generate")}
    feedback_lines = [e for e in logs if e.get("rpc") == "Feedback"]
    assert len(feedback_lines) == 3 and {e["request_id"] for e in feedback_lines} <= served
