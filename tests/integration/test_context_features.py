"""Client context features through the real server, broker and learner: the bandit learns
an arm that depends on a categorical feature, bad context is refused, and a change of the
context schema keeps the old statistics in the stored learner state without using them."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import grpc
import pytest
from kafka import KafkaProducer

from loraloop.client import LoraLoopClient
from loraloop.core.adapters.store import AdapterStore
from loraloop.core.bandits.context_schema import load_context_schema
from loraloop.core.bandits.linear import POPULATION, population_key
from loraloop.core.gen.loraloop.v1 import events_pb2
from loraloop.core.settings import Settings
from loraloop.learner.loop import Learner
from tests.support import (
    InProcessServer,
    feedback_event,
    interaction_event,
    isolated_settings,
    read_topic,
    wait_until,
)

pytestmark = pytest.mark.kafka

ARMS = """
[[arm]]
name = "short"
system_prompt = "Answer in one line."

[[arm]]
name = "long"
system_prompt = "Answer at length."
"""
SCHEMA_V1 = """
version = 1

[[feature]]
name = "device"
type = "categorical"
values = ["mobile", "desktop"]
"""
SCHEMA_V2 = (
    SCHEMA_V1.replace("version = 1", "version = 2")
    + '\n[[feature]]\nname = "hour"\ntype = "numeric"\nmin = 0\nmax = 23\n'
)
USER = "dana"
BEST = {"mobile": "short", "desktop": "long"}  # what this user rewards, by device


class Stack:
    """A server and a learner (on a thread of its own) on the same settings."""

    def __init__(self, settings: Settings) -> None:
        self.server = InProcessServer(settings)
        self.learner = Learner(settings, max_users_per_step=4)
        self.learner.connect()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self.learner.run, args=(self._stop,), daemon=True)
        self._thread.start()
        self.strategy = self.server.running.service.strategy

    def pulls(self) -> int:
        return sum(n for _, n, _ in self.strategy.arm_stats(USER))

    def play(self, client: LoraLoopClient, rounds: int, **context: Any) -> list[tuple[str, str]]:
        """`rounds` requests alternating mobile/desktop, each with thumbs up when the arm
        is the device's best, down otherwise; waits for each update to reach the server."""
        played = []
        for i in range(rounds):
            device = ("mobile", "desktop")[i % 2]
            start = self.pulls()
            features = context | {"device": device}
            reply = client.generate(USER, "Capital of Peru?", max_tokens=4, context=features)
            played.append((device, reply.arm))
            thumbs = 1 if reply.arm == BEST[device] else -1
            assert client.feedback(reply.request_id, USER, thumbs=thumbs)
            wait_until(lambda s=start: self.pulls() > s, 30, "the bandit update at the server")
        return played

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(30)
        self.learner.close()
        self.server.stop()


def _code(fn: Any, *args: Any, **kwargs: Any) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as info:
        fn(*args, **kwargs)
    return info.value.code(), info.value.details() or ""


def test_context_teaches_the_bandit_and_a_schema_change_keeps_the_old_statistics(
    kafka_bootstrap: str, tmp_path: Path
) -> None:
    (tmp_path / "arms.toml").write_text(ARMS)
    (tmp_path / "v1.toml").write_text(SCHEMA_V1)
    (tmp_path / "v2.toml").write_text(SCHEMA_V2)
    v1, v2 = load_context_schema(tmp_path / "v1.toml"), load_context_schema(tmp_path / "v2.toml")
    settings = isolated_settings(
        kafka_bootstrap,
        tmp_path,
        arms_file=tmp_path / "arms.toml",
        context_schema_file=tmp_path / "v1.toml",
    )

    # --- schema v1: the bandit learns the device's arm -----------------------------------
    stack = Stack(settings)
    try:
        with LoraLoopClient(stack.server.target, timeout=60) as client:
            played = stack.play(client, 60)
            mobile = stack.strategy.features(10, False, {}, {"device": "mobile"})
            desktop = stack.strategy.features(10, False, {}, {"device": "desktop"})
            p_mobile = stack.strategy.choice_probabilities(USER, mobile)
            p_desktop = stack.strategy.choice_probabilities(USER, desktop)

            # bad context: INVALID_ARGUMENT naming the feature and the schema version
            for context, says in (
                ({"weekday": "mon"}, "'weekday' is not in context schema version 1"),
                ({"device": 3}, "'device' is categorical"),
                ({"hour": 5}, "'hour' is not in context schema version 1"),
            ):
                code, details = _code(client.generate, USER, "hi", max_tokens=2, context=context)
                assert code == grpc.StatusCode.INVALID_ARGUMENT and says in details, details
            # a value the schema does not list: served, counted (none of the values)
            assert client.generate(USER, "hi", max_tokens=2, context={"device": "tv"}).arm
            assert stack.strategy.unknown_values["device"] == 1
        learner_v1 = stack.learner.stats.copy()
    finally:
        stack.stop()
    assert p_mobile["short"] > 0.8 and p_desktop["long"] > 0.8, (p_mobile, p_desktop, played)
    last = played[-16:]
    assert sum(arm == BEST[device] for device, arm in last) >= 12, played
    assert learner_v1["bandit_schema_samples"] == 0 and learner_v1["unknown_arms"] == 0
    events = [
        events_pb2.Interaction.FromString(r.value)
        for r in read_topic(kafka_bootstrap, settings.topic_interactions)
    ]
    assert {e.context_schema for e in events} == {v1.fingerprint}
    assert all(len(e.context) == v1.dim == 5 for e in events)
    assert {tuple(e.context[3:]) for e in events} == {(1.0, 0.0), (0.0, 1.0), (0.0, 0.0)}

    store = AdapterStore(settings.adapter_store)
    old_state = store.learner_state(USER, store.versions(USER)[-1])["bandit"]
    old_pulls = {a: old_state[a]["n"] for a in ("short", "long")}
    assert old_state["_schema"] == v1.fingerprint and sum(old_pulls.values()) == 60

    # --- schema v2: the v1 statistics are kept in the learner state, not used ------------
    settings_v2 = settings.model_copy(update={"context_schema_file": tmp_path / "v2.toml"})
    stack = Stack(settings_v2)
    try:
        # the server replays the v1 states on bandit-state: ignored, counted
        wait_until(lambda: stack.strategy.ignored_states >= 2, 30, "the bandit-state replay")
        assert not stack.strategy.has_state(USER)
        with LoraLoopClient(stack.server.target, timeout=60) as client:
            stack.play(client, 4, hour=13)
            assert stack.pulls() == 4  # the new schema's statistics only
        # an interaction logged under v1 (a server not yet given the new file): the
        # adapter learns from it, the bandit does not
        now = int(time.time() * 1000)
        old = interaction_event(USER, "old-1", now, arm="short", arm_propensity=0.5)
        old.context[:] = [1.0, 0.1, 0.0, 1.0, 0.0]
        old.context_schema = v1.fingerprint
        producer = KafkaProducer(bootstrap_servers=kafka_bootstrap)
        producer.send(settings.topic_interactions, key=USER.encode(), value=old.SerializeToString())
        feedback = feedback_event(USER, "old-1", now)
        producer.send(
            settings.topic_feedback, key=USER.encode(), value=feedback.SerializeToString()
        )
        producer.flush()
        producer.close()
        wait_until(
            lambda: (
                stack.learner.stats["bandit_schema_samples"] == 1
                and stack.learner.stats["samples"] == 5
            ),
            30,
            "the v1 interaction learnt by the adapter",
        )
        learner_v2 = stack.learner.stats.copy()
    finally:
        stack.stop()
    assert learner_v2["bandit_schema_set_aside"] == 1
    assert learner_v2["bandit_schema_samples"] == 1 and learner_v2["unknown_arms"] == 0
    state = store.learner_state(USER, store.versions(USER)[-1])
    assert state["bandit"]["_schema"] == v2.fingerprint
    assert sum(state["bandit"][a]["n"] for a in ("short", "long")) == 4
    kept = state["bandit_other_schemas"][v1.fingerprint]
    assert {a: kept[a]["n"] for a in ("short", "long")} == old_pulls and kept == old_state
    keys = {r.key.decode() for r in read_topic(kafka_bootstrap, settings.topic_bandit_state)}
    assert {population_key(v1.fingerprint), population_key(v2.fingerprint)} <= keys
    assert POPULATION not in keys  # the built-in schema's pool was never used here

    # --- back to v1: its statistics come back, v2's are kept in turn ---------------------
    back = Learner(settings, max_users_per_step=4)  # reads the store only
    model = back.users.get(USER)
    assert {a: s.n for a, s in model.bandit.stats.items()} == old_pulls
    assert model.bandit.schema == v1.fingerprint and v2.fingerprint in model.other_bandits
    assert back.stats["bandit_schema_set_aside"] == 1
