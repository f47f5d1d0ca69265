"""Unusable events on the real broker: the learner skips and counts them, copies each to
the dead-letter topic with headers naming its source and the error, keeps running, and
still applies the valid events produced before, between and after them.

Run with `-s` for the figures: records produced by kind, counted, dead-lettered, errors.
"""

from __future__ import annotations

import math
import threading
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from kafka import KafkaProducer

from loraloop.core.adapters.store import AdapterStore
from loraloop.core.gen.loraloop.v1 import common_pb2, events_pb2
from loraloop.core.settings import Settings
from loraloop.learner.dead_letter import (
    HEADER_ERROR,
    HEADER_GROUP,
    HEADER_OFFSET,
    HEADER_PARTITION,
    HEADER_TOPIC,
    header_values,
)
from loraloop.learner.loop import Learner
from tests.support import isolated_settings, read_topic, wait_until

pytestmark = pytest.mark.kafka

VOCAB = 2048  # the tiny model's


def interaction(user: str, rid: str, **fields: Any) -> events_pb2.Interaction:
    values: dict[str, Any] = {
        "request_id": rid,
        "user_id": user,
        "timestamp_ms": 1_000,
        "prompt_token_ids": [1, 40, 41, 42],
        "response_token_ids": [50, 51, 52, 2],
        "behaviour_logprobs": [-1.0] * 4,
    }
    values.update(fields)
    return events_pb2.Interaction(**values)


def feedback(user: str, rid: str, **signals: Any) -> events_pb2.FeedbackEvent:
    return events_pb2.FeedbackEvent(
        request_id=rid,
        user_id=user,
        timestamp_ms=1_000,
        signals=common_pb2.FeedbackSignals(**(signals or {"thumbs": 1})),
    )


def bad_records(s: Settings) -> list[tuple[str, str, bytes | None, str]]:
    """(label, topic, value, a fragment of the error) of every kind of unusable record."""
    i, f = s.topic_interactions, s.topic_feedback
    ok = interaction("ann", "x")
    wrong_type = events_pb2.AdapterUpdated(user_id="ann", version=3, uri="file:///x")
    return [
        ("garbage bytes", i, b"\xff not protobuf \x00\x01", "DecodeError"),
        ("garbage bytes", f, b"\x08\x96\x01\xff\xff\xff\xff", "DecodeError"),
        ("truncated event", i, ok.SerializeToString()[:-3], "DecodeError"),
        ("no value (tombstone)", i, None, "Error"),
        ("wrong type: AdapterUpdated", i, wrong_type.SerializeToString(), "user_id is empty"),
        (
            "wrong type: Interaction on feedback",
            f,
            interaction("ann", "wt", prompt="").SerializeToString(),
            "signals is empty",
        ),
        ("missing request_id", i, interaction("ann", "").SerializeToString(), "request_id"),
        (
            "missing prompt tokens",
            i,
            interaction("ann", "m1", prompt_token_ids=[]).SerializeToString(),
            "prompt_token_ids is empty",
        ),
        (
            "missing signals",
            f,
            events_pb2.FeedbackEvent(request_id="m2", user_id="ann").SerializeToString(),
            "signals is empty",
        ),
        (
            "token outside the vocabulary",
            i,
            interaction("ann", "v1", response_token_ids=[50, VOCAB, 52, 2]).SerializeToString(),
            "vocabulary",
        ),
        (
            "negative token id",
            i,
            interaction("ann", "v2", prompt_token_ids=[1, -5]).SerializeToString(),
            "vocabulary",
        ),
        (
            "log-probs of the wrong length",
            i,
            interaction("ann", "l1", behaviour_logprobs=[-1.0]).SerializeToString(),
            "behaviour_logprobs",
        ),
        (
            "NaN log-prob",
            i,
            interaction(
                "ann", "l2", behaviour_logprobs=[-1.0, math.nan, -1.0, -1.0]
            ).SerializeToString(),
            "behaviour_logprobs",
        ),
        (
            "longer than the model's context",
            i,
            interaction("ann", "c1", prompt_token_ids=[5] * 1100).SerializeToString(),
            "context",
        ),
        ("NaN rating", f, feedback("ann", "r9", rating=math.nan).SerializeToString(), "rating"),
        ("thumbs of 7", f, feedback("ann", "r9", thumbs=7).SerializeToString(), "thumbs"),
        *(
            (f"user_id {user!r}", topic, event.SerializeToString(), "user_id")
            for user in ("../etc", "", "a b", "\u00fc", "x" * 129, "..")
            for topic, event in ((i, interaction(user, "u1")), (f, feedback(user, "u1")))
        ),
    ]


# --- hypothesis-fuzzed payloads -------------------------------------------------------


def flipped(data: bytes) -> st.SearchStrategy[bytes]:
    """`data` with a byte changed, removed or inserted."""
    n = len(data)
    return st.one_of(
        st.tuples(st.integers(0, n - 1), st.integers(0, 255)).map(
            lambda t: data[: t[0]] + bytes([t[1]]) + data[t[0] + 1 :]
        ),
        st.integers(0, n - 1).map(lambda k: data[:k] + data[k + 1 :]),
        st.tuples(st.integers(0, n), st.binary(min_size=1, max_size=4)).map(
            lambda t: data[: t[0]] + t[1] + data[t[0] :]
        ),
    )


fuzzed_interactions = st.builds(
    lambda rid, user, prompt, response, lps, temp: events_pb2.Interaction(
        request_id=rid,
        user_id=user,
        timestamp_ms=1_000,
        prompt_token_ids=prompt,
        response_token_ids=response,
        behaviour_logprobs=lps,
        sampling=common_pb2.SamplingParams(temperature=temp),
    ).SerializeToString(),
    st.text(max_size=30),
    st.one_of(st.from_regex(r"fz[a-z0-9]{0,6}", fullmatch=True), st.text(max_size=10)),
    st.lists(st.integers(-(2**31), 2**31 - 1), max_size=6),
    st.lists(st.integers(-10, VOCAB + 10), max_size=6),
    st.lists(st.floats(width=32), max_size=6),
    st.floats(width=32),
)
fuzzed_payloads = st.one_of(
    st.binary(max_size=200),
    fuzzed_interactions,
    flipped(interaction("fz", "flip").SerializeToString()),
    flipped(feedback("fz", "flip").SerializeToString()),
)


def draw_payloads(n: int) -> list[tuple[bool, bytes]]:
    """n hypothesis-drawn (to the interactions topic?, payload) pairs."""
    drawn: list[tuple[bool, bytes]] = []

    @settings(max_examples=n, database=None, deadline=None, suppress_health_check=list(HealthCheck))
    @given(st.booleans(), fuzzed_payloads)
    def collect(to_interactions: bool, payload: bytes) -> None:
        drawn.append((to_interactions, payload))

    collect()
    return drawn


# --- the test ---------------------------------------------------------------------------


class RunningLearner:
    """`Learner.run` on a thread of its own; an exception there is kept for the test."""

    def __init__(self, learner: Learner) -> None:
        self.learner = learner
        self.stop = threading.Event()
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            self.learner.run(self.stop, poll_ms=100)
        except BaseException as exc:
            self.error = exc

    def alive(self) -> bool:
        return self.thread.is_alive() and self.error is None

    def close(self) -> None:
        self.stop.set()
        self.thread.join(30)
        self.learner.close()


@pytest.fixture
def learner(kafka_bootstrap: str, tmp_path: Path) -> Iterator[RunningLearner]:
    settings_ = isolated_settings(kafka_bootstrap, tmp_path)
    lrn = Learner(settings_, max_users_per_step=8)
    lrn.connect()  # creates the topics, the dead-letter one included
    running = RunningLearner(lrn)
    yield running
    running.close()


def test_unusable_events_are_dead_lettered_and_valid_ones_applied(learner) -> None:
    lrn = learner.learner
    s = lrn.settings
    producer = KafkaProducer(bootstrap_servers=s.kafka_bootstrap, acks="all")
    sent: dict[tuple[str, int, int], tuple[str, bytes | None, bytes | None, str]] = {}

    def send(topic: str, key: bytes | None, value: bytes | None, label: str, error: str) -> None:
        meta = producer.send(topic, key=key, value=value).get(timeout=30)
        sent[(topic, meta.partition, meta.offset)] = (label, key, value, error)

    def send_valid(user: str, rid: str) -> int:
        """A valid interaction and its feedback (same key: same partition number)."""
        key = user.encode()
        value = interaction(user, rid).SerializeToString()
        meta = producer.send(s.topic_interactions, key=key, value=value).get(timeout=30)
        producer.send(s.topic_feedback, key=key, value=feedback(user, rid).SerializeToString())
        return meta.partition

    # valid before, every kind of unusable record, valid between, fuzzed, valid after
    send_valid("ann", "ann-1")
    bad = bad_records(s)
    for label, topic, value, error in bad:
        send(topic, b"ann", value, label, error)
    send_valid("ben", "ben-1")
    fuzzed = draw_payloads(300)
    futures = [
        producer.send(s.topic_interactions if to_i else s.topic_feedback, key=b"fz", value=payload)
        for to_i, payload in fuzzed
    ]
    producer.flush()
    fuzz_positions = {(f.get().topic, f.get().partition, f.get().offset) for f in futures}
    # Valid events after everything, on every partition: once they are applied, every
    # record before them has been consumed (a partition is read in order).
    users, covered = ["ann", "ben"], set()
    for n in range(100):
        if len(covered) == s.topic_partitions:
            break
        users.append(f"late-{n}")
        covered.add(send_valid(users[-1], f"late-{n}-1"))
    producer.flush()

    store = AdapterStore(s.adapter_store)
    wait_until(
        lambda: all(store.versions(u) for u in users) or not learner.alive(),
        90,
        "the valid events around the bad ones to be applied",
    )
    assert learner.alive(), f"the learner stopped: {learner.error!r}"
    assert all(store.versions(u) == [1] for u in users)

    # every explicit bad record, and every fuzzed record the learner refused, is in the
    # dead-letter topic exactly once, unchanged, with its source and the error
    wait_until(
        lambda: lrn.stats["dead_lettered"] >= len(bad), 30, "the bad records to be dead-lettered"
    )
    lrn.producer.flush()
    letters = read_topic(s.kafka_bootstrap, s.topic_dead_letter)
    by_source: dict[tuple[str, int, int], Any] = {}
    for record in letters:
        h = header_values(record.headers)
        source = (h[HEADER_TOPIC], int(h[HEADER_PARTITION]), int(h[HEADER_OFFSET]))
        assert source not in by_source, f"{source} dead-lettered twice"
        assert h[HEADER_GROUP] == s.group_id and h[HEADER_ERROR]
        by_source[source] = record
    errors: Counter[str] = Counter()
    for position, (label, key, value, fragment) in sent.items():
        assert position in by_source, f"{label} at {position} is not in the dead-letter topic"
        record = by_source[position]
        error = header_values(record.headers)[HEADER_ERROR]
        assert fragment in error, f"{label}: error {error!r} does not mention {fragment!r}"
        assert (record.key, record.value) == (key, value), label
        errors[error.split(":")[0]] += 1
    assert set(by_source) <= set(sent) | fuzz_positions  # nothing valid was dead-lettered
    fuzzed_refused = len(set(by_source) & fuzz_positions)
    assert lrn.stats["malformed"] == len(by_source) == lrn.stats["dead_lettered"]
    assert lrn.stats["dead_letter_failed"] == 0
    exported = lrn.metrics.registry.get_sample_value("loraloop_learner_records_dead_lettered_total")
    assert exported == len(by_source)

    print(
        f"\nproduced: {len(bad)} unusable of {len({b[0] for b in bad})} kinds, "
        f"{len(fuzzed)} hypothesis-fuzzed, {2 * len(users)} valid ({len(users)} users)"
        f"\nlearner: malformed {lrn.stats['malformed']}, dead-lettered "
        f"{lrn.stats['dead_lettered']} ({fuzzed_refused} of the fuzzed; the other "
        f"{len(fuzzed) - fuzzed_refused} decoded into usable events), versions "
        f"{lrn.stats['versions']}, still running: {learner.alive()}"
        f"\nerrors of the explicit records: {dict(errors)}"
    )
