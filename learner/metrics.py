"""Prometheus metrics of the learner, on a registry of its own.

The learner already counts what it does in `Learner.stats` and its joiner's counters;
`_StatsCollector` reads those at scrape time, so a new count needs no second bookkeeping
(the rollback guard, for instance, only does `stats["rollbacks"] += 1`). The loop reports
each batched step (`observe_step`: latency, rewards), each user's part of it
(`observe_update`: KL, gradient norm) and, every few seconds, the consumer lag and the
committed-offset lag per partition (`observe_lag`).

All names start with `loraloop_learner_`; times are in seconds.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from prometheus_client import CollectorRegistry, Gauge, Histogram, Info
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

log = logging.getLogger(__name__)

STEP_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
REWARD_BUCKETS = (-1, -0.75, -0.5, -0.25, 0, 0.25, 0.5, 0.75, 1)
KL_BUCKETS = (1e-5, 1e-4, 1e-3, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1, 2, 5)
GRAD_BUCKETS = (1e-4, 1e-3, 0.01, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10)
LAG_INTERVAL_S = 2.0

# Learner.stats key -> (metric name without _total, help). Absent keys count as 0.
STATS_COUNTERS = {
    "updates": ("loraloop_learner_updates", "Batched policy-gradient steps taken."),
    "versions": (
        "loraloop_learner_versions_written",
        "Adapter versions written to the store and announced on adapter-updates.",
    ),
    "samples": ("loraloop_learner_samples", "Joined samples learnt from."),
    "no_arm": (
        "loraloop_learner_samples_no_arm",
        "Samples served with no arm applied (the request set an arm's lever itself): learnt "
        "from by the adapter, credited to no arm.",
    ),
    "malformed": (
        "loraloop_learner_records_malformed",
        "Kafka records that did not decode, or held an event the learner cannot use, "
        "and were skipped.",
    ),
    "dead_lettered": (
        "loraloop_learner_records_dead_lettered",
        "Skipped records copied to the dead-letter topic (with their source and the error).",
    ),
    "dead_letter_failed": (
        "loraloop_learner_dead_letter_failures",
        "Skipped records whose copy to the dead-letter topic failed.",
    ),
    "deleted_users": (
        "loraloop_learner_users_deleted",
        "Users whose adapters were deleted after a tombstone.",
    ),
    "rollbacks": (
        "loraloop_learner_rollbacks",
        "Adapter versions rolled back by the rollback guard.",
    ),
    "unreadable_versions": (
        "loraloop_learner_adapter_versions_unreadable",
        "Stored adapter versions the learner could not read (corrupt, truncated, failing "
        "their checksum) and learnt on past, from an older version or the initial adapter.",
    ),
    "publish_failed": (
        "loraloop_learner_publish_failures",
        "Records Kafka refused (AdapterUpdated, tombstones, bandit statistics), each try; "
        "they are sent again and offsets are not committed until they are acknowledged.",
    ),
    "publish_timeouts": (
        "loraloop_learner_publish_timeouts",
        "Rounds whose records Kafka had not acknowledged within "
        "learner_publish_timeout_seconds (offsets committed in a later round).",
    ),
    "deletions_forgotten": (
        "loraloop_learner_deletions_forgotten",
        "Deleted users forgotten beyond learner_deleted_users_max (oldest first): their "
        "pre-deletion events are no longer dropped.",
    ),
    "reannounced": (
        "loraloop_learner_versions_reannounced",
        "Newest versions announced again on adapter-updates after a replay (a learner "
        "killed between writing a version and announcing it).",
    ),
    "versions_retired": (
        "loraloop_learner_versions_retired",
        "Old adapter versions deleted from the store by retention (adapter_keep_versions, "
        "adapter_retention_grace_seconds).",
    ),
    "retention_failed": (
        "loraloop_learner_retention_failures",
        "Users whose old adapter versions could not be deleted (a store error); tried again "
        "at their next announcement.",
    ),
}
# Reasons of loraloop_learner_adapter_write_failures_total (loop.write_failure_reason).
WRITE_FAILURE_LABELS = (
    "no_space",
    "read_only",
    "permission",
    "io",
    "too_many_files",
    "other_os",
    "conflict",
    "other",
)
# Learner.stats key -> reason label of loraloop_learner_samples_skipped_total.
SKIP_REASONS = {
    "skipped_applied": "already_applied",
    "skipped_deleted": "user_deleted",
    # logged by a server with another base model (LORALOOP_MODEL_ID differs): learning
    # from them would train this model on another one's samples
    "skipped_other_model": "other_base_model",
}
# Learner.stats key -> kind label of loraloop_learner_bandit_schema_mismatch_total: what
# was found over another context schema than the learner's (context_schema_file).
BANDIT_SCHEMA_KINDS = {
    # a user's stored statistics: kept in the learner state under their fingerprint
    "bandit_schema_set_aside": "user_statistics",
    # pooled statistics on bandit-state at start-up under this schema's key: not used
    "bandit_schema_population": "population_statistics",
    # interactions logged under another schema: learnt by the adapter, not the bandit
    "bandit_schema_samples": "interactions",
}
# Joiner counter attributes -> outcome label of loraloop_learner_joiner_events_total.
JOINER_OUTCOMES = ("duplicate", "expired", "late", "orphaned", "mismatched")


class LearnerMetrics:
    """Every collector of one learner process, on `self.registry`."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self.info = Info(
            "loraloop_learner", "The learning process: model and algorithm.", registry=r
        )
        self.update_duration = Histogram(
            "loraloop_learner_update_duration_seconds",
            "Wall time of one batched step (forward, backward, optimiser) over many users.",
            buckets=STEP_BUCKETS,
            registry=r,
        )
        self.reward = Histogram(
            "loraloop_learner_reward",
            "Reward of each sample learnt from, by algorithm.",
            ("algorithm",),
            buckets=REWARD_BUCKETS,
            registry=r,
        )
        # A histogram with negative buckets has no _sum, hence the mean as a gauge too.
        self.reward_mean = Gauge(
            "loraloop_learner_reward_mean",
            "Mean reward of the samples in the last batched step, by algorithm.",
            ("algorithm",),
            registry=r,
        )
        self.kl = Histogram(
            "loraloop_learner_kl",
            "Per-token KL divergence of a user's policy to the base model at an update.",
            ("algorithm",),
            buckets=KL_BUCKETS,
            registry=r,
        )
        self.grad_norm = Histogram(
            "loraloop_learner_grad_norm",
            "Norm of a user's gradient at an update, before clipping.",
            ("algorithm",),
            buckets=GRAD_BUCKETS,
            registry=r,
        )
        self.consumer_lag = Gauge(
            "loraloop_learner_consumer_lag",
            "Records of a partition not yet fetched by the learner (high-water mark minus "
            "position), per topic and partition.",
            ("topic", "partition"),
            registry=r,
        )
        self.committed_lag = Gauge(
            "loraloop_learner_committed_lag",
            "Records of a partition past the learner group's committed offset (high-water "
            "mark minus committed offset), per topic and partition: fetched but not yet "
            "fully applied, or not fetched yet; what a restart would read again.",
            ("topic", "partition"),
            registry=r,
        )
        self.committed_offset = Gauge(
            "loraloop_learner_committed_offset",
            "The learner group's committed offset, per topic and partition.",
            ("topic", "partition"),
            registry=r,
        )
        self.last_update = Gauge(
            "loraloop_learner_last_update_timestamp_seconds",
            "Unix time of the last batched step.",
            registry=r,
        )
        self.algorithm = "reinforce"
        self._stats = _StatsCollector()
        r.register(self._stats)
        self._lag_due = 0.0
        self._group_committed: dict[tuple[str, int], int] = {}  # fetched once per partition

    def watch(self, learner: Any, algorithm: str, model_id: str) -> None:
        """Report `learner.stats` and its joiner's counters at every scrape."""
        self.algorithm = algorithm
        self._stats.learner = learner
        self.info.info({"algorithm": algorithm, "model": model_id})
        for histogram in (self.reward, self.kl, self.grad_norm):
            histogram.labels(algorithm)

    def observe_step(self, seconds: float, batches: Sequence[Any]) -> None:
        """One batched step: its latency and the reward of every sample in it."""
        self.update_duration.observe(seconds)
        self.last_update.set(time.time())
        rewards = [value for batch in batches for value in getattr(batch, "rewards", ())]
        for value in rewards:
            self.reward.labels(self.algorithm).observe(value)
        if rewards:
            self.reward_mean.labels(self.algorithm).set(sum(rewards) / len(rewards))

    def observe_update(self, update: Any) -> None:
        """One user's part of a step: KL to the base model and gradient norm."""
        if (kl := getattr(update, "kl", None)) is not None:
            self.kl.labels(self.algorithm).observe(kl)
        if (norm := getattr(update, "grad_norm", None)) is not None:
            self.grad_norm.labels(self.algorithm).observe(norm)

    def observe_lag(
        self,
        consumer: Any,
        force: bool = False,
        committed: Mapping[tuple[str, int], int] | None = None,
    ) -> None:
        """Refresh the lag gauges (at most every LAG_INTERVAL_S) from the consumer's cached
        high-water marks. `committed`: the offsets the learner last committed, per (topic,
        partition); a partition it has not committed yet is asked of the broker once (its
        group's committed offset; none: 0)."""
        now = time.monotonic()
        if consumer is None or (now < self._lag_due and not force):
            return
        self._lag_due = now + LAG_INTERVAL_S
        committed = committed or {}
        try:
            lags, behind = {}, {}
            for tp in consumer.assignment():
                high = consumer.highwater(tp)
                position = consumer.position(tp, timeout_ms=100)
                if high is None or position is None:
                    continue
                labels = (tp.topic, str(tp.partition))
                lags[labels] = max(0, high - position)
                done = committed.get((tp.topic, tp.partition))
                if done is None:
                    done = self._group_offset(consumer, tp)
                behind[labels] = (done, max(0, high - done))
        except Exception as exc:  # a rebalance in progress: try again next time
            log.debug("consumer lag unavailable: %s", exc)
            return
        self.consumer_lag.clear()  # partitions moved to another consumer disappear
        for labels, lag in lags.items():
            self.consumer_lag.labels(*labels).set(lag)
        self.committed_lag.clear()
        self.committed_offset.clear()
        for labels, (offset, lag) in behind.items():
            self.committed_lag.labels(*labels).set(lag)
            self.committed_offset.labels(*labels).set(offset)

    def _group_offset(self, consumer: Any, tp: Any) -> int:
        key = (tp.topic, tp.partition)
        if key not in self._group_committed:
            self._group_committed[key] = consumer.committed(tp, timeout_ms=1000) or 0
        return self._group_committed[key]


class _StatsCollector(Collector):
    """Counters the learner and its joiner keep, read when Prometheus scrapes."""

    def __init__(self) -> None:
        self.learner: Any = None

    def collect(self) -> Iterable[Metric]:
        stats = getattr(self.learner, "stats", None)
        joiner = getattr(self.learner, "joiner", None)
        for key, (name, doc) in STATS_COUNTERS.items():
            family = CounterMetricFamily(name, doc)
            if stats is not None:
                family.add_metric([], stats.get(key, 0))
            yield family
        family = CounterMetricFamily(
            "loraloop_learner_samples_skipped",
            "Joined samples not learnt from, by reason (already_applied: a replay; "
            "other_base_model: logged for another base model).",
            labels=("reason",),
        )
        if stats is not None:
            for key, reason in SKIP_REASONS.items():
                family.add_metric([reason], stats.get(key, 0))
        yield family
        family = CounterMetricFamily(
            "loraloop_learner_bandit_schema_mismatch",
            "Bandit statistics and logged contexts over another context schema than the "
            "learner's, not used, by kind: user_statistics (a user's, set aside in the "
            "learner state under their schema's fingerprint and restored when that schema "
            "comes back), population_statistics (pooled ones at start-up), interactions "
            "(contexts logged under another schema: the adapter learns from them, the "
            "bandit does not).",
            labels=("kind",),
        )
        if stats is not None:
            for key, kind in BANDIT_SCHEMA_KINDS.items():
                family.add_metric([kind], stats.get(key, 0))
        yield family
        family = CounterMetricFamily(
            "loraloop_learner_adapter_write_failures",
            "Adapter version writes that failed, by reason (no_space: ENOSPC/EDQUOT, "
            "read_only, permission, io: EIO, too_many_files, other_os: another OSError, "
            "conflict: the version was written by another learner, other). The version is "
            "kept with its samples and written again after a backoff (0.5 s doubling to "
            "10 s); offsets are not committed past its samples meanwhile.",
            labels=("reason",),
        )
        failures = getattr(self.learner, "write_failures", None)
        if failures is not None:
            for reason in WRITE_FAILURE_LABELS:
                family.add_metric([reason], failures.get(reason, 0))
        yield family
        unwritten = getattr(self.learner, "_unwritten", None)
        gauge = GaugeMetricFamily(
            "loraloop_learner_unwritten_samples",
            "Samples learnt into adapter versions whose write failed and waits for a retry.",
        )
        if unwritten is not None:
            gauge.add_metric([], sum(len(item.samples) for item in unwritten.values()))
        yield gauge
        family = CounterMetricFamily(
            "loraloop_learner_duplicates",
            "Copies of an event already seen (delivery to Kafka is at-least-once), skipped, "
            "by who recognised them: joiner (an interaction or feedback event whose request "
            "id it remembers, counted per event), store (a sample whose request id a stored "
            "version already learnt from at another position, after a restart; per sample).",
            labels=("seen_by",),
        )
        if joiner is not None:
            family.add_metric(["joiner"], getattr(joiner, "duplicates", 0))
        if stats is not None:
            family.add_metric(["store"], stats.get("skipped_duplicate", 0))
        yield family
        family = CounterMetricFamily(
            "loraloop_learner_joiner_events",
            "Events the joiner did not pair normally, by outcome (duplicate, expired, late, "
            "orphaned, mismatched).",
            labels=("outcome",),
        )
        if joiner is not None:
            for outcome in JOINER_OUTCOMES:
                attr = "duplicates" if outcome == "duplicate" else outcome
                if hasattr(joiner, attr):
                    family.add_metric([outcome], getattr(joiner, attr))
        yield family
