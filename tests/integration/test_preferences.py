"""Preference pairs end to end, against the real server, broker and learner: a regenerate
and an edit each become a pair the user's adapter learns from (the chosen response's
log-probability rises relative to the rejected one's; another user's adapter is not
touched), a replay learns no pair twice, and bad regenerates ids and edits get the right
gRPC status with a message that says what to send."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
import torch
from kafka import KafkaProducer

from loraloop.client import LoraLoopClient
from loraloop.core.adapters.peft_format import read_peft_dir
from loraloop.core.adapters.store import AdapterStore
from loraloop.core.gen.loraloop.v1 import common_pb2, events_pb2
from loraloop.core.kafka.admin import ensure_loraloop_topics
from loraloop.core.logprobs import response_logprobs
from loraloop.core.multi_lora import LoRAWeights
from loraloop.core.settings import Settings
from loraloop.learner.loop import Learner
from loraloop.learner.user_models import initial_weights
from tests.support import (
    InProcessServer,
    drain_learner,
    interaction_event,
    isolated_settings,
    read_topic,
)

pytestmark = pytest.mark.kafka

PROMPT = "How do I cook rice?"
MAX_EDIT = 300


@pytest.fixture(scope="module")
def stack(
    kafka_bootstrap: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[Settings, InProcessServer, Learner]]:
    settings = isolated_settings(
        kafka_bootstrap,
        tmp_path_factory.mktemp("preferences"),
        max_new_tokens=24,
        preference_learning="preference",
        preference_max_edit_chars=MAX_EDIT,
        learning_rate=5e-3,
    )
    ensure_loraloop_topics(settings)
    server = InProcessServer(settings)
    learner = Learner(settings, max_users_per_step=4)
    learner.connect()
    yield settings, server, learner
    learner.close()
    server.stop()


@pytest.fixture
def client(stack: tuple[Settings, InProcessServer, Learner]) -> Iterator[LoraLoopClient]:
    with LoraLoopClient(stack[1].target, timeout=60, retries=1) as c:
        yield c


def interactions(settings: Settings, server: InProcessServer) -> dict[str, Any]:
    server.running.service.events.flush()
    records = read_topic(settings.kafka_bootstrap, settings.topic_interactions)
    return {e.request_id: e for e in (events_pb2.Interaction.FromString(r.value) for r in records)}


def newest_weights(settings: Settings, user: str) -> LoRAWeights:
    store = AdapterStore(settings.adapter_store)
    return read_peft_dir(store.get(user, store.versions(user)[-1]).path)


def margin(learner: Learner, weights: LoRAWeights, prompt, chosen, rejected) -> float:
    """log pi(chosen | prompt) - log pi(rejected | prompt) under `weights`."""
    lm = learner.lm
    lm.bank.load(1, weights)
    try:
        with torch.no_grad():
            lps = response_logprobs(lm.model, lm.bank, [prompt, prompt], [chosen, rejected], [1, 1])
    finally:
        lm.bank.clear(1)
    return float(lps[0].sum() - lps[1].sum())


def two_different_replies(client: LoraLoopClient, user: str) -> tuple[Any, Any]:
    """A reply, then its regenerate (another seed, until the tokens differ)."""
    first = client.generate(user, PROMPT, max_tokens=16, seed=1)
    client.feedback(first.request_id, user, regenerated=True)
    for seed in range(2, 10):
        again = client.generate(
            user, PROMPT, max_tokens=16, seed=seed, regenerates=first.request_id
        )
        if again.text != first.text:
            return first, again
        client.feedback(again.request_id, user, regenerated=True)
        first = again
    raise AssertionError("the model gave the same reply for every seed")


def test_a_regenerate_is_a_pair_the_users_adapter_learns_from(stack, client) -> None:
    settings, server, learner = stack
    bystander = initial_weights(learner.lm.bank, "reg-bob", settings.seed)
    bob = client.generate("reg-bob", PROMPT, max_tokens=16, seed=1)
    client.feedback(bob.request_id, "reg-bob", thumbs=1)  # a sample, no pair
    replaced, chosen = two_different_replies(client, "reg-alice")
    client.feedback(chosen.request_id, "reg-alice", thumbs=1)
    pairs_before = learner.stats["pairs"]
    drain_learner(learner, lambda: learner.stats["pairs"] > pairs_before, "the regenerate pair")
    seen = interactions(settings, server)
    a, b = seen[replaced.request_id], seen[chosen.request_id]
    assert b.regenerates == replaced.request_id and not a.regenerates
    args = (list(a.prompt_token_ids), list(b.response_token_ids), list(a.response_token_ids))
    base = margin(learner, initial_weights(learner.lm.bank, "reg-alice", settings.seed), *args)
    after = margin(learner, newest_weights(settings, "reg-alice"), *args)
    print(f"\nregenerate pair: log-prob margin chosen - rejected {base:.4f} -> {after:.4f}")
    assert after > base + 1e-3, (base, after)
    # 'preference' mode: bob's thumbs teach his bandit, not his adapter; alice's pair
    # does not touch it either
    drain_learner(
        learner, lambda: AdapterStore(settings.adapter_store).versions("reg-bob"), "bob's version"
    )
    weights = newest_weights(settings, "reg-bob")
    for name in bystander.a:
        assert torch.equal(weights.a[name], bystander.a[name])
        assert torch.equal(weights.b[name], bystander.b[name])

    # A second learner replaying every topic from the start learns no pair twice.
    store = AdapterStore(settings.adapter_store)
    versions = {u: store.versions(u) for u in ("reg-alice", "reg-bob")}
    replay = Learner(
        settings.model_copy(update={"group_id": settings.group_id + "-replay"}),
        max_users_per_step=4,
    )
    replay.connect()
    try:
        learnt = learner.stats["samples"]
        drain_learner(replay, lambda: replay.stats["skipped_applied"] >= learnt, "the replay")
        assert replay.joiner.unpaired == 0  # the replaced interaction was read again
        assert replay.stats["pairs"] == 0 and replay.stats["versions"] == 0
        assert {u: store.versions(u) for u in versions} == versions
    finally:
        replay.close()


def test_an_edit_is_a_pair_the_users_adapter_learns_from(stack, client) -> None:
    settings, server, learner = stack
    reply = client.generate("edit-ann", PROMPT, max_tokens=16, seed=3)
    edit = "Certainly. Rinse the rice, then simmer it for twenty minutes. Kind regards."
    assert client.feedback(reply.request_id, "edit-ann", edited=True, edited_text=edit)
    pairs_before = learner.stats["pairs"]
    drain_learner(learner, lambda: learner.stats["pairs"] > pairs_before, "the edit pair")
    a = interactions(settings, server)[reply.request_id]
    chosen = learner.pair_maker.encode_response(edit, a.response_text)
    args = (list(a.prompt_token_ids), chosen, list(a.response_token_ids))
    base = margin(learner, initial_weights(learner.lm.bank, "edit-ann", settings.seed), *args)
    after = margin(learner, newest_weights(settings, "edit-ann"), *args)
    print(f"\nedit pair: log-prob margin chosen - rejected {base:.4f} -> {after:.4f}")
    assert after > base + 1e-3, (base, after)


def _status(call: Any) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as err:
        call()
    return err.value


def test_bad_regenerates_ids_are_refused_with_what_to_send(stack, client) -> None:
    other = client.generate("bad-bob", PROMPT, max_tokens=4)
    mine = client.generate("bad-alice", PROMPT, max_tokens=4)
    cases = {
        "not-an-id": grpc.StatusCode.INVALID_ARGUMENT,
        mine.request_id[:-1] + ("0" if mine.request_id[-1] != "0" else "1"): (
            grpc.StatusCode.INVALID_ARGUMENT
        ),
        other.request_id: grpc.StatusCode.PERMISSION_DENIED,
        "x" * 10_000: grpc.StatusCode.INVALID_ARGUMENT,
    }
    for rid, code in cases.items():
        err = _status(lambda rid=rid: client.generate("bad-alice", PROMPT, regenerates=rid))
        assert err.code() == code, (rid[:50], err)
        assert "regenerates" in (err.details() or "")
        assert len(err.details() or "") < 400  # the refused id is quoted short
    ok = client.generate("bad-alice", PROMPT, max_tokens=4, regenerates=mine.request_id)
    assert ok.request_id != mine.request_id


def test_bad_edits_are_refused_with_the_limit(stack, client) -> None:
    reply = client.generate("edit-bad", PROMPT, max_tokens=4)
    err = _status(lambda: client.feedback(reply.request_id, "edit-bad", edited_text="x" * 301))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "edited_text" in (err.details() or "") and str(MAX_EDIT) in (err.details() or "")
    err = _status(lambda: client.feedback(reply.request_id, "edit-bad", edited_text="  "))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "edited_text is empty" in (err.details() or "")


def test_a_restart_reads_the_replaced_interaction_again_and_pairs_it(
    kafka_bootstrap: str, tmp_path: Path
) -> None:
    """A is learnt from and the learner stops; B, regenerating A with no feedback of its
    own, comes later. A's offset was kept uncommitted, so the next learner reads A again,
    pairs B with it once B's window closes, and learns the pair alone (B has no reward)
    without learning A twice."""
    wait_s = 60
    settings = isolated_settings(
        kafka_bootstrap, tmp_path, preference_learning="preference", reward_wait_seconds=wait_s
    )
    ensure_loraloop_topics(settings)
    t0 = int(time.time() * 1000)
    producer = KafkaProducer(bootstrap_servers=kafka_bootstrap)
    try:

        def send(topic: str, event: Any) -> None:
            producer.send(topic, key=event.user_id.encode(), value=event.SerializeToString())
            producer.flush()

        send(settings.topic_interactions, interaction_event("ada", "a", t0))
        regenerated = common_pb2.FeedbackSignals(regenerated=True)
        send(
            settings.topic_feedback,
            events_pb2.FeedbackEvent(
                request_id="a", user_id="ada", timestamp_ms=t0 + 1, signals=regenerated
            ),
        )
        first = Learner(settings, max_users_per_step=2)
        first.connect()
        store = AdapterStore(settings.adapter_store)
        try:
            drain_learner(first, lambda: store.versions("ada") == [1], "A learnt from")
            assert first.stats["pairs"] == 0
        finally:
            first.close()
        b = interaction_event(
            "ada", "b", t0 + 1000, regenerates="a", response_token_ids=[60, 61, 62, 2]
        )
        send(settings.topic_interactions, b)
        # another user's event far enough ahead in event time to close B's window
        send(settings.topic_interactions, interaction_event("tick", "t", t0 + wait_s * 1000 + 2000))
        second = Learner(settings, max_users_per_step=2)  # the same group: resumes
        second.connect()
        try:
            drain_learner(second, lambda: second.stats["pairs"] == 1, "the pair after a restart")
            # A read again (its feedback, committed, not): it closes with B, unlearnt
            assert second.joiner.expired == 2
            assert second.joiner.unpaired == 0
            assert store.versions("ada") == [1, 2]
            state = store.learner_state("ada", 2)
            assert [rid for rid, _ in state["learnt_from"]] == ["b"]
        finally:
            second.close()
    finally:
        producer.close()
