"""The adapter store's filesystem fills up under the learner: every version it cannot write
is kept (weights, learner state, samples) and written again with backoff until the disk
has room, so every sample is applied exactly once without a restart; meanwhile offsets
are not committed past the unwritten samples, and the failures and the committed-offset
lag show in the learner's metrics.

- a real `loraloop learn` process with its store on a small tmpfs (8 MiB) that the test
  fills to ENOSPC, then frees (needs root to mount; skipped with the reason otherwise);
- the in-process learner with store writes failing ENOSPC (runs anywhere).

Counts come from the store's own records of what each version learnt from, as in the
crash tests (retention is off here, so every version stays to be audited).
"""

from __future__ import annotations

import errno
import os
import subprocess
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from kafka import KafkaProducer
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from loraloop.core.adapters.store import AdapterStore
from loraloop.core.kafka.admin import ensure_loraloop_topics
from loraloop.learner.loop import Learner
from tests.faults.crash_support import (
    USERS,
    EventStream,
    all_applied,
    audit,
    committed_to_end,
    scrape,
    start_learner,
)
from tests.support import drain_learner, isolated_settings, wait_until

pytestmark = pytest.mark.kafka


def _sum(metrics: dict[str, float], name: str) -> float:
    return sum(v for k, v in metrics.items() if k == name or k.startswith(name + "{"))


@contextmanager
def small_tmpfs(where: Path, size: str = "8m") -> Iterator[Path]:
    where.mkdir(parents=True, exist_ok=True)
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)],
        capture_output=True,
        text=True,
    )
    if mounted.returncode != 0:
        pytest.skip(
            f"cannot mount a {size} tmpfs (needs root, CAP_SYS_ADMIN): "
            f"{(mounted.stderr or mounted.stdout).strip()}"
        )
    try:
        yield where
    finally:
        if subprocess.run(["umount", str(where)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(where)], capture_output=True)


def fill(path: Path) -> int:
    """Write `path` until its filesystem has no byte left (ENOSPC); bytes written."""
    written = 0
    with path.open("wb", buffering=0) as f:
        for chunk in (1 << 20, 1 << 12, 1):
            block = b"\0" * chunk
            while True:
                try:
                    written += f.write(block)
                except OSError as exc:
                    assert exc.errno == errno.ENOSPC, exc
                    break
    return written


def test_a_full_store_filesystem_delays_samples_but_loses_none(
    kafka_bootstrap: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with small_tmpfs(tmp_path / "fs") as fs:
        settings = isolated_settings(
            kafka_bootstrap,
            tmp_path,
            adapter_store=fs / "adapters",
            adapter_keep_versions=0,  # keep every version: the audit reads them all
            learner_session_timeout_seconds=6,
            learner_metrics_port=0,
        )
        ensure_loraloop_topics(settings)
        store = AdapterStore(settings.adapter_store)
        stream = EventStream(settings, KafkaProducer(bootstrap_servers=kafka_bootstrap))
        marker = tmp_path / "paused-at"
        learner = start_learner(settings, monkeypatch, None, marker)
        try:
            stream.round("before")
            wait_until(lambda: all_applied(store, stream.produced), 120, "the first versions")
            versions_before = {u: store.versions(u) for u in USERS}

            filler = fs / "filler"
            filled = fill(filler)
            full_at = time.monotonic()
            for i in range(3):
                stream.round(f"full{i}")
            wait_until(
                lambda: (
                    _sum(scrape(learner), "loraloop_learner_adapter_write_failures_total")
                    >= 2 * len(USERS)
                ),
                60,
                f"failed writes to be counted and retried\n{learner.output}",
            )
            wait_until(
                lambda: _sum(scrape(learner), "loraloop_learner_committed_lag") > 0,
                30,
                "the committed-offset lag to show the unapplied samples",
            )
            time.sleep(3)  # the disk stays full a while: retries back off
            during = scrape(learner)
            assert {u: store.versions(u) for u in USERS} == versions_before
            full_s = time.monotonic() - full_at

            filler.unlink()
            freed_at = time.monotonic()
            wait_until(
                lambda: all_applied(store, stream.produced) and committed_to_end(settings),
                120,
                f"every sample applied and committed after the disk was freed\n{learner.output}",
            )
            recovered_s = time.monotonic() - freed_at
            wait_until(
                lambda: _sum(scrape(learner), "loraloop_learner_committed_lag") == 0,
                30,
                "the committed-offset lag back to 0",
            )
            after = scrape(learner)
        finally:
            returncode = learner.stop()
            stream.producer.close()
        assert returncode == 0, learner.output
        result = audit(store, stream.produced)  # before the tmpfs goes
        partial = [p for u in USERS for p in store.partial_writes(u)]

    failures = {
        k.split("reason=")[1].rstrip("}"): v
        for k, v in after.items()
        if k.startswith("loraloop_learner_adapter_write_failures_total{") and v
    }
    print(
        f"\nstore on an 8 MiB tmpfs, filled ({filled / 2**20:.1f} MiB filler) for {full_s:.1f} s: "
        f"{stream.samples} samples ({stream.samples - 2 * len(USERS)} while full); "
        f"failed writes {failures}, "
        f"unwritten samples {during['loraloop_learner_unwritten_samples']:.0f} and committed "
        f"lag {_sum(during, 'loraloop_learner_committed_lag'):.0f} records while full; "
        f"{recovered_s:.1f} s after the disk was freed every sample applied and committed: "
        f"{result.applied} applied in {result.versions} versions, duplicates "
        f"{result.duplicates}, lost {result.lost}; committed lag "
        f"{_sum(after, 'loraloop_learner_committed_lag'):.0f}"
    )
    assert result.duplicates == 0 and result.lost == 0 and result.unknown == 0
    assert result.applied == stream.samples
    assert failures.get("no_space", 0) >= 2 * len(USERS)
    assert during["loraloop_learner_unwritten_samples"] > 0
    assert after["loraloop_learner_unwritten_samples"] == 0
    assert partial == []  # failed tries leave no temporary directory behind


# --- in process: store writes fail with ENOSPC -------------------------------------------


def _metrics(learner: Learner) -> dict[str, float]:
    values = {}
    for family in text_string_to_metric_families(
        generate_latest(learner.metrics.registry).decode()
    ):
        for sample in family.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(sample.labels.items()))
            values[f"{sample.name}{{{labels}}}" if labels else sample.name] = sample.value
    return values


def _drain(learner: Learner, until: Callable[[], bool], what: str, timeout: float = 90) -> None:
    """drain_learner, reading the committed lag after every round (the test watches it)."""

    def observe() -> None:
        assert learner.consumer is not None
        learner.metrics.observe_lag(learner.consumer, force=True, committed=learner.committed)

    drain_learner(learner, until, what, timeout, each=observe)


def test_failed_writes_are_retried_and_every_sample_applied_once(
    kafka_bootstrap: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = isolated_settings(kafka_bootstrap, tmp_path, adapter_keep_versions=0)
    ensure_loraloop_topics(settings)
    store = AdapterStore(settings.adapter_store)
    stream = EventStream(settings, KafkaProducer(bootstrap_servers=kafka_bootstrap))
    disk: dict[str, Any] = {"full": False, "refused": 0}
    write = AdapterStore.write

    def write_or_enospc(self: AdapterStore, *args: Any, **kwargs: Any) -> Any:
        if disk["full"]:
            disk["refused"] += 1
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return write(self, *args, **kwargs)

    monkeypatch.setattr(AdapterStore, "write", write_or_enospc)
    learner = Learner(settings, max_users_per_step=4)
    try:
        learner.connect()
        stream.round("before")
        _drain(learner, lambda: all_applied(store, stream.produced), "the first versions")
        disk["full"] = True
        stream.round("full0")
        stream.round("full1")
        _drain(learner, lambda: disk["refused"] >= 3 * len(USERS), "writes to be retried")
        during = _metrics(learner)
        assert not learner.joiner.pending  # joined, learnt, only the writes are missing
        disk["full"] = False
        _drain(
            learner,
            lambda: all_applied(store, stream.produced) and committed_to_end(settings),
            "every sample applied and committed once writes succeed",
        )
        _drain(learner, lambda: _sum(_metrics(learner), "loraloop_learner_committed_lag") == 0, "0")
        after = _metrics(learner)
    finally:
        learner.close()
        stream.producer.close()

    result = audit(store, stream.produced)
    assert result.duplicates == 0 and result.lost == 0 and result.unknown == 0
    assert result.applied == stream.samples
    failed = after["loraloop_learner_adapter_write_failures_total{reason=no_space}"]
    assert failed == disk["refused"] >= 3 * len(USERS)
    # each user's first version while full (full0's samples, with full1's if they came in
    # the same poll); the later samples wait for it
    assert 2 * len(USERS) <= during["loraloop_learner_unwritten_samples"] <= 4 * len(USERS)
    assert _sum(during, "loraloop_learner_committed_lag") > 0
    assert after["loraloop_learner_unwritten_samples"] == 0
    assert after["loraloop_learner_samples_total"] == stream.samples
