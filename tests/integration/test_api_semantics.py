"""What the API's answers mean, against the real server on loopback, the real broker and
the real learner: a plain prompt is a user turn; the arm is applied wherever it is
credited, and an interaction no arm could be applied to is credited to none; `accepted`,
`deleted` and OK mean that the feedback counts, that something was deleted and that the
interaction was logged; forged request ids are NOT_FOUND; recent_reward is the mean of
recent rewards; adapters and interactions of another base model are refused."""

from __future__ import annotations

import re
import shutil
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import grpc
import pytest
from kafka import KafkaProducer

from loraloop.client import LoraLoopClient
from loraloop.configs import DEMO_ARMS
from loraloop.core.adapters.peft_format import to_peft_files
from loraloop.core.adapters.store import AdapterStore
from loraloop.core.gen.loraloop.v1 import api_pb2, api_pb2_grpc, common_pb2, events_pb2
from loraloop.core.kafka.admin import ensure_loraloop_topics
from loraloop.core.settings import Settings
from loraloop.learner.loop import Learner
from loraloop.learner.user_models import initial_weights
from tests.support import (
    InProcessServer,
    drain_learner,
    feedback_event,
    interaction_event,
    isolated_settings,
    poll_learner,
    read_topic,
    wait_until,
)

pytestmark = pytest.mark.kafka

ROLE_MARKER = re.compile(r"^\s*(system|user|assistant)\s*:")
PROMPTS = ("hi", "How do I cook rice?", "Tell me about travel", "What should I see in Tokyo?")
WAIT_S = 3.0  # the module server's reward window


@pytest.fixture(scope="module")
def served(
    kafka_bootstrap: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[Settings, InProcessServer]]:
    settings = isolated_settings(
        kafka_bootstrap,
        tmp_path_factory.mktemp("semantics"),
        arms_file=DEMO_ARMS,
        max_new_tokens=32,
        reward_wait_seconds=WAIT_S,
    )
    ensure_loraloop_topics(settings)
    server = InProcessServer(settings)
    yield settings, server
    server.stop()


@pytest.fixture
def client(served: tuple[Settings, InProcessServer]) -> Iterator[LoraLoopClient]:
    with LoraLoopClient(served[1].target, timeout=60, retries=1) as c:
        yield c


def _interactions(settings: Settings, server: InProcessServer) -> dict[str, Any]:
    server.running.service.events.flush()
    return {
        e.request_id: e
        for e in (
            events_pb2.Interaction.FromString(r.value)
            for r in read_topic(settings.kafka_bootstrap, settings.topic_interactions)
        )
    }


def _code(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as info:
        fn(*args, **kwargs)
    return info.value.code(), info.value.details()


# --- 1. a plain prompt is a user turn; the arm is applied where it is credited --------------
def test_plain_prompt_replies_do_not_start_with_a_role_marker(client: LoraLoopClient) -> None:
    """Fed as raw text, the tiny model continued the prompt as a transcript: 56 of 80
    replies began with a role marker ("\\nassistant: ..."); as a user turn it answers."""
    n = 20
    marked = 0
    for prompt in PROMPTS:
        for seed in range(n):
            reply = client.generate(f"plain{seed}", prompt, max_tokens=24, seed=seed, arm="default")
            marked += bool(ROLE_MARKER.match(reply.text))
    share = marked / (n * len(PROMPTS))
    print(f"\nplain-prompt replies starting with a role marker: {marked}/{n * len(PROMPTS)}")
    assert share <= 0.05


def test_plain_prompt_goes_through_the_chat_template_like_a_user_message(
    served: tuple[Settings, InProcessServer], client: LoraLoopClient
) -> None:
    plain = client.generate("tmpl", "How do I cook rice?", max_tokens=8, seed=5, arm="default")
    chat = client.generate(
        "tmpl", messages=[("user", "How do I cook rice?")], max_tokens=8, seed=5, arm="default"
    )
    assert plain.text == chat.text and plain.prompt_tokens == chat.prompt_tokens
    events = _interactions(*served)
    assert events[plain.request_id].prompt_token_ids == events[chat.request_id].prompt_token_ids


def test_the_arm_is_applied_to_plain_prompts(
    served: tuple[Settings, InProcessServer], client: LoraLoopClient
) -> None:
    reply = client.generate("armed", "How do I cook rice?", max_tokens=8, arm="friendly")
    base = client.generate("armed", "How do I cook rice?", max_tokens=8, arm="default")
    assert reply.arm == "friendly"
    events = _interactions(*served)
    event = events[reply.request_id]
    assert event.arm == "friendly" and event.arm_propensity == 1.0
    assert event.prompt.startswith("system: Be warm and friendly.\nuser: How do I cook rice?")
    # the system prompt's tokens are in what the model saw
    assert len(event.prompt_token_ids) > len(events[base.request_id].prompt_token_ids)
    # the bandit's own choice (no pin) is applied to plain prompts too
    chosen = client.generate("armed2", "How do I cook rice?", max_tokens=4)
    event = _interactions(*served)[chosen.request_id]
    assert chosen.arm == event.arm and event.arm in {"default", "friendly", "formal", "brief"}
    assert event.prompt.startswith("system: ") == (event.arm != "default")


def test_a_request_with_its_own_system_message_is_logged_as_such_and_credits_no_arm(
    served: tuple[Settings, InProcessServer], client: LoraLoopClient
) -> None:
    settings, server = served
    user = "own-system"
    replies = [
        client.generate(
            user, messages=[("system", "Be brief."), ("user", "Hi!")], max_tokens=4, arm=arm
        )
        for arm in (None, "friendly")
    ]
    assert [r.arm for r in replies] == ["", ""]  # nothing of any arm was applied
    events = _interactions(settings, server)
    for reply in replies:
        event = events[reply.request_id]
        assert event.arm == "" and event.arm_propensity == 0.0
        assert list(event.request_overrides) == ["system_prompt"]
        assert event.prompt == "system: Be brief.\nuser: Hi!"  # the client's system message only
        assert client.feedback(reply.request_id, user, thumbs=1)
    server.running.service.events.flush()
    learner = Learner(settings.model_copy(update={"group_id": settings.group_id + "-own"}))
    learner.connect()
    try:
        drain_learner(
            learner,
            lambda: AdapterStore(settings.adapter_store).versions(user) != [],
            "the learner to learn from both samples",
            60,
        )
        drain_learner(learner, lambda: learner.stats["samples"] >= 2, "both samples", 30)
        model = learner.users.get(user)
        assert all(s.n == 0 for s in model.bandit.stats.values())  # no arm credited
        assert all(s.n == 0 for s in learner.population.stats.values())
        assert learner.stats.get("no_arm") == 2 and learner.stats["unknown_arms"] == 0
    finally:
        learner.close()


# --- 2. accepted / deleted / OK mean what they say ------------------------------------------
def test_a_changed_vote_is_accepted_once_and_counted_once(
    served: tuple[Settings, InProcessServer], client: LoraLoopClient
) -> None:
    """feedback_aggregation="earliest" (the default): the first feedback on a request is
    the one that counts; the server says so for the others."""
    settings, server = served
    user = "voter"
    reply = client.generate(user, "How do I cook rice?", max_tokens=4, arm="brief")
    votes = [client.feedback(reply.request_id, user, thumbs=t) for t in (1, -1, 1)]
    assert votes == [True, False, False]
    server.running.service.events.flush()
    learner = Learner(settings.model_copy(update={"group_id": settings.group_id + "-vote"}))
    learner.connect()
    try:
        drain_learner(learner, lambda: learner.stats["samples"] >= 1, "the vote's sample", 60)
        poll_learner(learner, 5)
        stats = learner.users.get(user).bandit.stats
        assert stats["brief"].n == 1 and stats["brief"].reward_sum == 1.0
    finally:
        learner.close()


def test_with_sum_every_vote_in_the_window_is_accepted_and_their_rewards_added(
    kafka_bootstrap: str, tmp_path: Path
) -> None:
    settings = isolated_settings(
        kafka_bootstrap,
        tmp_path,
        arms_file=DEMO_ARMS,
        feedback_aggregation="sum",
        reward_wait_seconds=2.0,
        max_new_tokens=8,
    )
    ensure_loraloop_topics(settings)
    server = InProcessServer(settings)
    learner = Learner(settings)
    learner.connect()
    try:
        with LoraLoopClient(server.target, timeout=60, retries=1) as client:
            reply = client.generate("summer", "hi", max_tokens=4, arm="brief")
            votes = [client.feedback(reply.request_id, "summer", thumbs=t) for t in (-1, 1, 1)]
            assert votes == [True, True, True]
            time.sleep(2.5)
            later = client.generate("summer", "hi", max_tokens=4, arm="formal")  # moves time on
            assert client.feedback(reply.request_id, "summer", thumbs=1) is False  # window closed
        server.running.service.events.flush()
        drain_learner(learner, lambda: learner.stats["samples"] >= 1, "the summed sample", 60)
        stats = learner.users.get("summer").bandit.stats
        assert stats["brief"].n == 1 and stats["brief"].reward_sum == 1.0  # -1 + 1 + 1, clipped
        assert stats["formal"].n == 0  # its window is still open
        assert later.arm == "formal"
    finally:
        learner.close()
        server.stop()


def test_feedback_after_the_reward_window_is_not_accepted(client: LoraLoopClient) -> None:
    reply = client.generate("slowpoke", "hi", max_tokens=2)
    time.sleep(WAIT_S + 0.5)
    response = client._stub.Feedback(
        api_pb2.FeedbackRequest(
            request_id=reply.request_id,
            user_id="slowpoke",
            signals=common_pb2.FeedbackSignals(thumbs=1),
        ),
        timeout=30,
    )
    assert not response.accepted and response.reason == "late"


def test_feedback_on_an_id_issued_before_delete_user_is_not_accepted(
    client: LoraLoopClient,
) -> None:
    reply = client.generate("forgotten", "hi", max_tokens=2)
    client.delete_user("forgotten")
    response = client._stub.Feedback(
        api_pb2.FeedbackRequest(
            request_id=reply.request_id,
            user_id="forgotten",
            signals=common_pb2.FeedbackSignals(thumbs=1),
        ),
        timeout=30,
    )
    assert not response.accepted and response.reason == "user_deleted"
    after = client.generate("forgotten", "hi", max_tokens=2)  # a new id after the deletion
    assert client.feedback(after.request_id, "forgotten", thumbs=1)


def test_delete_user_says_whether_anything_existed(
    served: tuple[Settings, InProcessServer], client: LoraLoopClient
) -> None:
    settings, server = served
    assert client.delete_user("never-seen") is False
    store = AdapterStore(settings.adapter_store)
    weights = initial_weights(server.running.service.engine.lm.bank, "had-one", 0)
    files = to_peft_files(weights, server.running.service.engine.model_id, settings.lora_targets)
    store.write("had-one", 1, files, {"updates": 1})
    assert client.delete_user("had-one") is True
    # until the learner removes them, the versions are still there to be deleted
    assert client.delete_user("had-one") is True
    shutil.rmtree(store.user_dir("had-one"))  # what the learner does on the tombstone
    assert client.delete_user("had-one") is False  # nothing left


def test_generate_never_loses_its_interaction_when_the_event_queue_is_full(
    kafka_bootstrap: str, tmp_path: Path
) -> None:
    """event_queue_size=2: every OK reply's interaction reaches Kafka; the calls that could
    not be logged were refused with RESOURCE_EXHAUSTED before generating."""
    settings = isolated_settings(kafka_bootstrap, tmp_path, event_queue_size=2, max_new_tokens=8)
    ensure_loraloop_topics(settings)
    server = InProcessServer(settings)
    try:
        with grpc.insecure_channel(server.target) as channel:
            stub = api_pb2_grpc.LoraLoopStub(channel)

            def call(i: int) -> tuple[str, str]:
                request = api_pb2.GenerateRequest(
                    user_id=f"q{i}",
                    prompt="hi",
                    sampling=common_pb2.SamplingParams(max_tokens=8, seed=i),
                )
                try:
                    return "OK", stub.Generate(request, timeout=60).request_id
                except grpc.RpcError as err:
                    return err.code().name, err.details() or ""

            with ThreadPoolExecutor(24) as pool:
                results = list(pool.map(call, range(48)))
        events = server.running.service.events
        events.flush()
        logged = {
            events_pb2.Interaction.FromString(r.value).request_id
            for r in read_topic(kafka_bootstrap, settings.topic_interactions)
        }
        ok = [rid for code, rid in results if code == "OK"]
        refused = [d for code, d in results if code != "OK"]
        print(f"\nqueue of 2, 48 calls: {len(ok)} OK, {len(refused)} refused, {len(logged)} logged")
        assert ok and set(ok) <= logged
        assert all(code in {"OK", "RESOURCE_EXHAUSTED"} for code, _ in results)
        assert all("event queue" in d for d in refused)
        assert events.dropped_by.get("queue_full", 0) == 0  # refused instead, before generating
        assert events.reserved == 0  # every place held was used or handed back
    finally:
        server.stop()


# --- 3. forged request ids ------------------------------------------------------------------
def test_forged_request_ids_are_not_found_and_another_users_are_permission_denied(
    client: LoraLoopClient,
) -> None:
    reply = client.generate("owner", "hi", max_tokens=2)
    code, details = _code(client.feedback, reply.request_id, "intruder", thumbs=1)
    assert code == grpc.StatusCode.PERMISSION_DENIED, details
    for forged in (
        "0" * 24 + "." + "0" * 24,
        reply.request_id[:-1] + ("0" if reply.request_id[-1] != "0" else "1"),
        "1" + reply.request_id[1:] if reply.request_id[0] != "1" else "2" + reply.request_id[1:],
    ):
        for user in ("owner", "intruder"):
            code, details = _code(client.feedback, forged, user, thumbs=1)
            assert code == grpc.StatusCode.NOT_FOUND, (forged, user, details)
            assert "request_id" in details


# --- 4. recent_reward -----------------------------------------------------------------------
def test_recent_reward_is_the_mean_of_the_users_recent_rewards(
    served: tuple[Settings, InProcessServer], client: LoraLoopClient
) -> None:
    settings, server = served
    user = "cheerful"
    reply = client.generate(user, "hi", max_tokens=4)
    assert client.feedback(reply.request_id, user, thumbs=1)
    server.running.service.events.flush()
    learner = Learner(settings.model_copy(update={"group_id": settings.group_id + "-mean"}))
    learner.connect()
    try:
        drain_learner(
            learner,
            lambda: AdapterStore(settings.adapter_store).versions(user) == [1],
            "the user's first version",
            60,
        )
    finally:
        learner.close()
    wait_until(lambda: client.user_state(user).adapter_version == 1, 30, "v1 at the server")
    state = client.user_state(user)
    assert state.updates == 1
    assert state.recent_reward == pytest.approx(1.0)  # one perfect thumbs-up (was 0.1)


# --- 5. another base model ------------------------------------------------------------------
def test_a_version_for_another_base_model_is_rejected_and_counted(
    served: tuple[Settings, InProcessServer], client: LoraLoopClient
) -> None:
    settings, server = served
    service = server.running.service
    user = "foreign"
    store = AdapterStore(settings.adapter_store)
    weights = initial_weights(service.engine.lm.bank, user, 0)
    for b in weights.b.values():
        b.fill_(0.01)
    stored = store.write(user, 1, to_peft_files(weights, "another/model", settings.lora_targets))
    before = service.registry.rejected
    producer = KafkaProducer(bootstrap_servers=settings.kafka_bootstrap)
    try:
        update = events_pb2.AdapterUpdated(
            user_id=user,
            version=1,
            uri=stored.uri,
            checksum=stored.checksum,
            base_model_id="another/model",
        )
        producer.send(
            settings.topic_adapter_updates, key=user.encode(), value=update.SerializeToString()
        )
        producer.flush()
    finally:
        producer.close()
    wait_until(lambda: service.registry.rejected > before, 20, "the version to be rejected")
    reply = client.generate(user, "hi", max_tokens=2)
    assert reply.adapter_version == 0  # the base model, not an adapter for another model
    assert service.registry.rejected == before + 1
    # found by the store listing (never announced): its adapter_config.json tells
    store.write("foreign2", 1, to_peft_files(weights, "another/model", settings.lora_targets))
    assert client.generate("foreign2", "hi", max_tokens=2).adapter_version == 0
    assert service.registry.rejected == before + 2
    # announced with a checksum the store's files do not have: not the version announced
    ours = to_peft_files(weights, service.engine.model_id, settings.lora_targets)
    stored = store.write("foreign3", 1, ours)
    producer = KafkaProducer(bootstrap_servers=settings.kafka_bootstrap)
    try:
        update = events_pb2.AdapterUpdated(
            user_id="foreign3",
            version=1,
            uri=stored.uri,
            checksum="0" * 64,
            base_model_id=service.engine.model_id,
        )
        producer.send(
            settings.topic_adapter_updates, key=b"foreign3", value=update.SerializeToString()
        )
        producer.flush()
    finally:
        producer.close()
    wait_until(lambda: service.registry.rejected == before + 3, 20, "the third rejection")
    assert client.generate("foreign3", "hi", max_tokens=2).adapter_version == 0
    metrics = server.running.metrics
    assert metrics is not None
    integrity = metrics.registry.get_sample_value(
        "loraloop_server_adapter_versions_rejected_total", {"kind": "integrity"}
    )
    assert integrity is not None and integrity >= 3


def test_the_learner_skips_interactions_of_another_base_model(
    kafka_bootstrap: str, tmp_path: Path
) -> None:
    settings = isolated_settings(kafka_bootstrap, tmp_path)
    ensure_loraloop_topics(settings)
    learner = Learner(settings)
    learner.connect()
    producer = KafkaProducer(bootstrap_servers=kafka_bootstrap)
    try:
        now = int(time.time() * 1000)
        for rid, model in (("theirs", "another/model"), ("ours", learner.lm.model_id)):
            event = interaction_event("mixed", rid, now, model_id=model)
            producer.send(
                settings.topic_interactions, key=b"mixed", value=event.SerializeToString()
            )
            fb = feedback_event("mixed", rid, now + 1)
            producer.send(settings.topic_feedback, key=b"mixed", value=fb.SerializeToString())
        producer.flush()
        drain_learner(learner, lambda: learner.stats["samples"] >= 1, "our sample", 60)
        poll_learner(learner, 3)
        assert learner.users.get("mixed").applied == ["ours"]
        assert learner.stats["samples"] == 1
        assert learner.stats.get("skipped_other_model") == 1
        # and exported, so a model id that differs between server and learner shows
        exported = learner.metrics.registry.get_sample_value(
            "loraloop_learner_samples_skipped_total", {"reason": "other_base_model"}
        )
        assert exported == 1
    finally:
        producer.close()
        learner.close()


def test_a_clients_adapter_floor_makes_a_replica_behind_look_in_the_store(
    served: tuple[Settings, InProcessServer], client: LoraLoopClient
) -> None:
    """min_adapter_version: a version another replica served (in the store, its
    announcement not here yet) is served here too, never an older one; the Python client
    sends the newest version it has had."""
    settings, server = served
    service = server.running.service
    user = "floored"
    assert client.generate(user, "hi", max_tokens=2).adapter_version == 0  # known: base
    store = AdapterStore(settings.adapter_store)
    weights = initial_weights(service.engine.lm.bank, user, 0)
    store.write(user, 1, to_peft_files(weights, service.engine.model_id, settings.lora_targets))
    stub = api_pb2_grpc.LoraLoopStub(client._channel)

    def ask(floor: int) -> api_pb2.GenerateResponse:
        request = api_pb2.GenerateRequest(
            user_id=user,
            prompt="hi",
            sampling=common_pb2.SamplingParams(max_tokens=2),
            min_adapter_version=floor,
        )
        return stub.Generate(request, timeout=60)

    assert ask(0).adapter_version == 0  # unannounced, no floor: this replica's view
    before = service.registry.floor_catch_ups
    assert ask(1).adapter_version == 1  # a client that had v1 elsewhere
    assert service.registry.floor_catch_ups == before + 1
    assert ask(0).adapter_version == 1  # and the view moved on for everyone
    assert ask(7).adapter_version == 1  # a floor the store cannot meet is not an error
    code, details = _code(ask, -1)
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "min_adapter_version" in details
    # the client remembers what it was served, and sends it
    with LoraLoopClient(server.target, timeout=60) as fresh:
        assert fresh.generate(user, "hi", max_tokens=2).adapter_version == 1
        sent: list[int] = []
        real = fresh._stub.Generate
        fresh._stub.Generate = lambda req, **kw: (
            sent.append(req.min_adapter_version),
            real(req, **kw),
        )[1]  # type: ignore[method-assign]
        fresh.generate(user, "hi", max_tokens=2)
        assert sent == [1]
