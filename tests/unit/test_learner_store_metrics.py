"""The learner's metrics of its write path: failed adapter writes by reason, samples waiting
for a failed write, duplicates seen, and the committed-offset lag (high-water mark minus
the offset the group committed, not the fetch position)."""

from __future__ import annotations

import errno
from collections import Counter
from types import SimpleNamespace
from typing import Any

from kafka import TopicPartition
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from loraloop.core.adapters.store import AdapterStoreError
from loraloop.learner.loop import VersionTakenError, write_failure_reason
from loraloop.learner.metrics import WRITE_FAILURE_LABELS, LearnerMetrics


def _values(metrics: LearnerMetrics) -> dict[str, float]:
    out = {}
    for family in text_string_to_metric_families(generate_latest(metrics.registry).decode()):
        for s in family.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(s.labels.items()))
            out[f"{s.name}{{{labels}}}" if labels else s.name] = s.value
    return out


def test_write_failure_reasons() -> None:
    cases = {
        OSError(errno.ENOSPC, "full"): "no_space",
        OSError(errno.EDQUOT, "quota"): "no_space",
        OSError(errno.EROFS, "ro"): "read_only",
        OSError(errno.EACCES, "denied"): "permission",
        OSError(errno.EIO, "io"): "io",
        OSError(errno.EMFILE, "fds"): "too_many_files",
        OSError(errno.ENAMETOOLONG, "name"): "other_os",
        OSError("no errno"): "other_os",
        VersionTakenError("ann v3 was written by another writer"): "conflict",
        AdapterStoreError("something"): "other",
        ValueError("bug"): "other",
    }
    for exc, reason in cases.items():
        assert write_failure_reason(exc) == reason, exc
    assert set(cases.values()) == set(WRITE_FAILURE_LABELS)  # every label can happen


def test_write_failures_unwritten_samples_and_duplicates_are_exported() -> None:
    metrics = LearnerMetrics()
    learner = SimpleNamespace(
        stats={"skipped_duplicate": 2},
        joiner=SimpleNamespace(duplicates=5),
        write_failures=Counter({"no_space": 7}),
        _unwritten={"ann": SimpleNamespace(samples=[1, 2, 3]), "ben": SimpleNamespace(samples=[4])},
    )
    metrics.watch(learner, "reinforce", "tiny")
    values = _values(metrics)
    assert values["loraloop_learner_adapter_write_failures_total{reason=no_space}"] == 7
    assert values["loraloop_learner_adapter_write_failures_total{reason=io}"] == 0  # exported
    assert values["loraloop_learner_unwritten_samples"] == 4
    assert values["loraloop_learner_duplicates_total{seen_by=joiner}"] == 5
    assert values["loraloop_learner_duplicates_total{seen_by=store}"] == 2


class FakeConsumer:
    def __init__(self) -> None:
        self.parts = {
            TopicPartition("interactions", 0): (100, 100, 40),  # high, position, group's commit
            TopicPartition("interactions", 1): (50, 50, None),
            TopicPartition("feedback", 0): (30, 20, 20),
        }
        self.asked: list[Any] = []

    def assignment(self) -> set[TopicPartition]:
        return set(self.parts)

    def highwater(self, tp: TopicPartition) -> int:
        return self.parts[tp][0]

    def position(self, tp: TopicPartition, timeout_ms: int = 0) -> int:
        return self.parts[tp][1]

    def committed(self, tp: TopicPartition, timeout_ms: int = 0) -> int | None:
        self.asked.append(tp)
        return self.parts[tp][2]


def test_committed_lag_counts_from_the_committed_offset_not_the_fetch_position() -> None:
    metrics, consumer = LearnerMetrics(), FakeConsumer()
    # the learner committed interactions:0 up to 60 (samples above it wait for a write)
    metrics.observe_lag(consumer, force=True, committed={("interactions", 0): 60})
    values = _values(metrics)
    assert values["loraloop_learner_consumer_lag{partition=0,topic=interactions}"] == 0
    assert values["loraloop_learner_committed_lag{partition=0,topic=interactions}"] == 40
    assert values["loraloop_learner_committed_offset{partition=0,topic=interactions}"] == 60
    # not committed by this learner yet: the group's offset, asked once (none: 0)
    assert values["loraloop_learner_committed_lag{partition=1,topic=interactions}"] == 50
    assert values["loraloop_learner_committed_lag{partition=0,topic=feedback}"] == 10
    assert values["loraloop_learner_consumer_lag{partition=0,topic=feedback}"] == 10
    metrics.observe_lag(consumer, force=True, committed={("interactions", 0): 100})
    assert len(consumer.asked) == 2
    values = _values(metrics)
    assert values["loraloop_learner_committed_lag{partition=0,topic=interactions}"] == 0
