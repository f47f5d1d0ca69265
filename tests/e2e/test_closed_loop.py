"""The whole loop through real processes: Kafka broker, `loraloop serve`, `loraloop learn`.

A user's feedback goes through gRPC into Kafka, the learner writes a new adapter version,
the server hot-swaps it without a restart, and the next response for that user reports
it; another user is untouched; the update moved the rewarded response's log-probability
up and the penalised one's down.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from loraloop.client import LoraLoopClient
from loraloop.core.adapters.peft_format import read_peft_dir
from loraloop.core.adapters.store import AdapterStore
from loraloop.core.gen.loraloop.v1 import events_pb2
from loraloop.core.kafka.admin import ensure_loraloop_topics
from loraloop.core.logprobs import response_logprobs
from loraloop.core.model_loading import load_model
from loraloop.core.settings import Settings
from tests.support import Process, isolated_settings, read_topic, wait_until

pytestmark = [pytest.mark.kafka, pytest.mark.e2e]
PROMPT = "How do I cook pasta?"


@pytest.fixture
def loop(kafka_bootstrap: str, tmp_path: Path) -> Iterator[tuple[Settings, LoraLoopClient]]:
    settings = isolated_settings(kafka_bootstrap, tmp_path, learning_rate=0.02)
    ensure_loraloop_topics(settings)
    server = Process(["serve"], settings, ready=r"listening on [\d.]+:(\d+)")
    learner = None
    try:
        learner = Process(["learn"], settings, ready=r"learner consuming")
        assert server.match is not None
        with LoraLoopClient(f"127.0.0.1:{server.match.group(1)}", timeout=60) as client:
            client.wait_ready()
            yield settings, client
    finally:
        for proc in (learner, server):
            if proc is not None:
                assert proc.stop() == 0, proc.output


def _interaction(settings: Settings, request_id: str) -> events_pb2.Interaction:
    for record in read_topic(settings.kafka_bootstrap, settings.topic_interactions):
        event = events_pb2.Interaction.FromString(record.value)
        if event.request_id == request_id:
            return event
    raise AssertionError(f"no Interaction event for {request_id} in Kafka")


def _mean_logprob(
    lm, store: AdapterStore, user: str, version: int, event: events_pb2.Interaction
) -> float:
    slot = 0
    if version:
        lm.bank.load(1, read_peft_dir(store.get(user, version).path))
        slot = 1
    with torch.no_grad():
        (logp,) = response_logprobs(
            lm.model,
            lm.bank,
            [list(event.prompt_token_ids)],
            [list(event.response_token_ids)],
            [slot],
        )
    return float(logp.mean())


def test_feedback_updates_only_that_users_adapter_and_is_served_next(loop) -> None:
    settings, client = loop
    store = AdapterStore(settings.adapter_store)

    first = client.generate("alice", PROMPT, max_tokens=24, seed=1)
    other = client.generate("bob", PROMPT, max_tokens=24, temperature=0)
    assert (first.adapter_version, other.adapter_version) == (0, 0)
    assert client.feedback(first.request_id, "alice", thumbs=1, accepted=True)

    wait_until(lambda: client.user_state("alice").adapter_version == 1, 60, "alice's v1")
    second = client.generate("alice", PROMPT, max_tokens=24, seed=2)
    assert second.adapter_version == 1
    state = client.user_state("alice")
    assert state.updates == 1
    assert store.versions("alice") == [1]

    # bob is untouched: no version, served by the base model exactly as before
    assert client.user_state("bob").adapter_version == 0
    assert store.versions("bob") == []
    again = client.generate("bob", PROMPT, max_tokens=24, temperature=0)
    assert (again.adapter_version, again.text) == (0, other.text)

    # a penalised response makes v2
    assert client.feedback(second.request_id, "alice", thumbs=-1, regenerated=True)
    wait_until(lambda: client.user_state("alice").adapter_version == 2, 60, "alice's v2")
    assert client.generate("alice", PROMPT, max_tokens=8).adapter_version == 2

    # the updates moved log-probabilities the right way, measured on the exact tokens served
    lm = load_model(settings, slots=2)
    rewarded = _interaction(settings, first.request_id)
    penalised = _interaction(settings, second.request_id)
    assert rewarded.adapter_version == 0 and penalised.adapter_version == 1
    assert len(rewarded.behaviour_logprobs) == len(rewarded.response_token_ids) > 0
    up_before = _mean_logprob(lm, store, "alice", 0, rewarded)
    up_after = _mean_logprob(lm, store, "alice", 1, rewarded)
    down_before = _mean_logprob(lm, store, "alice", 1, penalised)
    down_after = _mean_logprob(lm, store, "alice", 2, penalised)
    assert up_after > up_before, (up_before, up_after)
    assert down_after < down_before, (down_before, down_after)

    # the AdapterUpdated events on the compacted topic tell the same story
    updates = [
        events_pb2.AdapterUpdated.FromString(r.value)
        for r in read_topic(settings.kafka_bootstrap, settings.topic_adapter_updates)
        if r.value is not None
    ]
    assert [(u.user_id, u.version) for u in updates] == [("alice", 1), ("alice", 2)]
    assert updates[0].checksum == store.get("alice", 1).checksum
    assert updates[0].metrics.mean_reward > 0 > updates[1].metrics.mean_reward
