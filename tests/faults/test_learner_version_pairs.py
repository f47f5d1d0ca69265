"""A user's weights and learner state always come from the same version.

The learner state stored with a version says which samples its weights learnt from. If
the newest version's state no longer reads but its weights do, learning on from those
weights with an older version's state would apply the newest version's samples a second
time; the other way round (weights unreadable, state fine) their learning would be lost
for good. Either way the learner must take both from the newest version where both read,
on the real store, with real learners replaying the real broker.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch
from kafka import KafkaProducer

from loraloop.core.adapters.peft_format import read_peft_dir
from loraloop.core.adapters.store import AdapterStore
from loraloop.core.adapters.version import ADAPTER_WEIGHTS, LEARNER_STATE
from loraloop.core.kafka.admin import ensure_loraloop_topics
from loraloop.learner.applied import AppliedOffsets
from loraloop.learner.loop import Learner
from tests.faults.test_learner_deletions import _send_pair
from tests.support import drain_learner, isolated_settings

pytestmark = pytest.mark.kafka

USER = "fay"


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("corrupt", [LEARNER_STATE, ADAPTER_WEIGHTS])
def test_weights_and_state_come_from_one_version(
    kafka_bootstrap: str, tmp_path: Path, corrupt: str
) -> None:
    s = isolated_settings(kafka_bootstrap, tmp_path, min_batch=1)
    ensure_loraloop_topics(s)
    store = AdapterStore(s.adapter_store)
    producer = KafkaProducer(bootstrap_servers=kafka_bootstrap)
    first = Learner(s, max_users_per_step=2)
    try:
        first.connect()
        now = int(time.time() * 1000)
        _send_pair(producer, s, USER, "r1", now)
        drain_learner(first, lambda: store.versions(USER) == [1], "v1")
        _send_pair(producer, s, USER, "r2", now + 1)
        drain_learner(first, lambda: store.versions(USER) == [1, 2], "v2")
    finally:
        first.close()
        producer.close()
    v1_weights = read_peft_dir(store.version_dir(USER, 1))
    v1_offsets = AppliedOffsets.from_json(store.learner_state(USER, 1)["applied_offsets"])
    (store.version_dir(USER, 2) / corrupt).write_bytes(b"\x00garbage, not what was written")

    # A learner of another group replays everything from the start.
    replay = Learner(
        s.model_copy(update={"group_id": s.group_id + "-replay"}), max_users_per_step=2
    )
    try:
        replay.connect()
        model = replay.users.get(USER)
        assert (model.version, model.loaded_from) == (2, 1)
        assert _same(model.weights.a, v1_weights.a) and _same(model.weights.b, v1_weights.b)
        assert model.offsets == v1_offsets
        drain_learner(replay, lambda: store.versions(USER) == [1, 2, 3], "v3 after the replay")
        stats = dict(replay.stats)
    finally:
        replay.close()

    # r1 is in v1's weights and state: skipped. r2's learning went with v2: learnt again,
    # once, on v1's weights.
    assert stats["skipped_applied"] == 1 and stats["unreadable_versions"] == 1, stats
    assert store.learner_state(USER, 3)["learnt_from"][0][0] == "r2"
    assert [rid for rid in _learnt_readable(store)] == ["r1", "r2"]
    print(
        f"\n{corrupt} of v2 corrupt: the learner took weights and state from v1, skipped "
        f"{stats['skipped_applied']} applied sample, learnt r2 again once into v3"
    )


def _learnt_readable(store: AdapterStore) -> list[str]:
    """What the readable versions (v1, v3) say they learnt from."""
    return [rid for v in (1, 3) for rid, _ in store.learner_state(USER, v).get("learnt_from", [])]
