"""The online learner: consume → join → reward → update → store → publish → commit.

`Learner.process` is the commit order, top to bottom. Offsets are committed only after
every sample they cover has been written to the store and its AdapterUpdated
acknowledged by Kafka, and each version records, atomically with its weights, which
interactions it and its predecessors learnt from (by Kafka position, see learner/applied.py,
and by request_id), so a crash at any point (kill -9 included) replays events without
applying any of them twice. A version written just before a crash, whose AdapterUpdated
never went out, is announced again when the replay finds its samples already applied.
A version whose write fails (a full disk, an I/O error) is kept as computed, with its
samples, and written again with backoff until it succeeds; its user's later samples wait
for it, and offsets are not committed past any of them. Once written versions are
announced long enough, retention deletes the old ones (learner/retention.py).
Everything published goes through an outbox (learner/outbox.py) that checks Kafka's
acknowledgement of each record: a refused record is sent again, and offsets are not
committed until all of it is acknowledged.

Each joined sample teaches a user two things at once: the bandit statistics of the arm
that was played (fast: adapts within a handful of interactions) and the user's LoRA
adapter (slow: a policy-gradient step, many users batched into one backward pass). With
preference_learning on, the preference pairs a sample carries (a regenerate, an edit:
learner/preferences.py) add a DPO loss to that step (learner/algos/dpo.py), or replace the
policy gradient; a sample without feedback that carries a pair is kept for the pair alone.
"""

from __future__ import annotations

import copy
import dataclasses
import errno
import logging
import time
from collections import Counter, defaultdict
from collections.abc import Iterable, Iterator
from typing import Any

import numpy as np
from kafka import KafkaConsumer, KafkaProducer, OffsetAndMetadata, TopicPartition
from kafka.errors import KafkaError

from loraloop.core.adapters.opening import open_adapter_store
from loraloop.core.adapters.store import AdapterStoreError
from loraloop.core.adapters.version import AdapterVersion
from loraloop.core.bandits.arms import load_arms
from loraloop.core.bandits.context_schema import load_context_schema, recorded_schema
from loraloop.core.bandits.linear import BanditState, population_key
from loraloop.core.event_checks import feedback_error, interaction_error
from loraloop.core.fault_points import pause_point
from loraloop.core.gen.loraloop.v1 import events_pb2
from loraloop.core.kafka.admin import ensure_loraloop_topics
from loraloop.core.kafka.replay import read_to_end
from loraloop.core.model_loading import LoadedModel, load_model
from loraloop.core.settings import Settings
from loraloop.core.user_ids import user_id_error
from loraloop.learner import guard
from loraloop.learner.algos.dpo import DPOConfig, PairBatch, preference_step
from loraloop.learner.algos.reinforce import AdamState, ReinforceConfig, UserBatch, reinforce_step
from loraloop.learner.announcements import Announcements
from loraloop.learner.applied import AppliedOffsets
from loraloop.learner.dead_letter import DeadLetter
from loraloop.learner.deletions import (
    DeletedUsers,
    deletion_time,
    from_learner,
    learner_tombstone_headers,
)
from loraloop.learner.joiner import Joiner, Sample
from loraloop.learner.metrics import LearnerMetrics
from loraloop.learner.outbox import Outbox, Outgoing
from loraloop.learner.preferences import PairMaker, PreferenceConfig
from loraloop.learner.retention import Retention
from loraloop.learner.rewards import reward, reward_config
from loraloop.learner.user_models import UserModel, UserModels, position_text

log = logging.getLogger(__name__)


class KafkaUnavailableError(RuntimeError):
    """The learner cannot work without Kafka: say so and how to fix it."""


class UnusableEventError(ValueError):
    """A record decoded, but into an event the learner cannot learn from."""


def _refuse(error: str | None) -> None:
    if error is not None:
        raise UnusableEventError(error)


# A failed adapter write is tried again after WRITE_RETRY_FIRST_S, the pause doubling per
# failure of the same version up to WRITE_RETRY_MAX_S.
WRITE_RETRY_FIRST_S = 0.5
WRITE_RETRY_MAX_S = 10.0
# reason label of loraloop_learner_adapter_write_failures_total (metrics.WRITE_FAILURE_LABELS)
WRITE_FAILURE_REASONS = {
    errno.ENOSPC: "no_space",
    errno.EDQUOT: "no_space",
    errno.EROFS: "read_only",
    errno.EACCES: "permission",
    errno.EPERM: "permission",
    errno.EIO: "io",
    errno.EMFILE: "too_many_files",
    errno.ENFILE: "too_many_files",
}


class VersionTakenError(AdapterStoreError):
    """The version the learner meant to write is in the store already, not with its samples."""


def write_failure_reason(exc: BaseException) -> str:
    """The reason label of a failed adapter write."""
    if isinstance(exc, VersionTakenError):
        return "conflict"
    if isinstance(exc, OSError):
        return WRITE_FAILURE_REASONS.get(exc.errno or 0, "other_os")
    return "other"


@dataclasses.dataclass
class _Unwritten:
    """A user's next version whose write failed, kept whole (weights, learner state and
    its samples, whose offsets stay held) and written again as it is after a backoff: it
    is never recomputed, so nothing is learnt twice, and nothing of it is lost."""

    model: UserModel  # the new version's model (its `version` still the one before it)
    samples: list[Sample]
    rewards: list[float]
    upd: Any
    rollback: str | None
    failures: int = 0
    next_try: float = 0.0


class Learner:
    def __init__(self, settings: Settings, max_users_per_step: int = 32) -> None:
        self.settings = settings
        # the bandit's context schema: statistics and contexts of another one are not used
        self.schema = load_context_schema(settings.context_schema_file)  # before the model
        self.lm: LoadedModel = load_model(settings, slots=max_users_per_step + 1)
        self.store = open_adapter_store(settings)
        self.arms = [a.name for a in load_arms(settings.arms_file)]
        self.users = UserModels(
            self.store,
            self.lm.bank,
            settings.seed,
            self.arms,
            on_unreadable=self._unreadable,
            schema=self.schema,
            on_schema_mismatch=self._schema_mismatch,
        )
        self._population_key = population_key(self.schema.fingerprint)
        self.population = BanditState(self.arms, self.schema.dim, self.schema.fingerprint)
        self.preferences = PreferenceConfig.from_settings(settings)
        self.joiner = Joiner(
            settings.reward_wait_seconds,
            settings.feedback_aggregation,
            pair_regenerates=self.preferences.uses("regenerate"),
        )
        self.algo = ReinforceConfig.from_settings(settings)
        self.dpo = DPOConfig.from_settings(settings)
        self.guard = guard.GuardConfig.from_settings(settings)
        self.rewards = reward_config(settings.reward_weights)
        self.max_users_per_step = max_users_per_step
        self._ready: dict[str, list[Sample]] = defaultdict(list)
        self._bandit_dirty: set[str] = set()
        # events from before a user's deletion are dropped (rebuilt at connect)
        self.deleted = DeletedUsers(settings.learner_deleted_users_max)
        self.stats = {
            "updates": 0,
            "versions": 0,
            "samples": 0,
            "skipped_applied": 0,
            "malformed": 0,
            "deleted_users": 0,
            "skipped_deleted": 0,
            "rollbacks": 0,
            "default_rewards": 0,
            "unknown_arms": 0,
            # over another context schema (metrics.BANDIT_SCHEMA_KINDS): kept, not used
            "bandit_schema_set_aside": 0,
            "bandit_schema_population": 0,
            "bandit_schema_samples": 0,
            "no_arm": 0,  # samples served with no arm applied: no arm credited
            "skipped_other_model": 0,  # samples logged for another base model
            "dead_lettered": 0,
            "dead_letter_failed": 0,
            "unreadable_versions": 0,
            "reannounced": 0,
            "publish_failed": 0,
            "publish_timeouts": 0,
            "deletions_restored": 0,
            "deletions_forgotten": 0,
            "skipped_duplicate": 0,
            "versions_retired": 0,
            "retention_failed": 0,
            "pairs": 0,  # preference pairs learnt from (written versions)
        }
        # versions whose write failed, per user, written again after a backoff (at most one
        # per user: the user's next update waits for it)
        self._unwritten: dict[str, _Unwritten] = {}
        self.write_failures: Counter[str] = Counter()  # by write_failure_reason()
        # the offsets this learner last committed, per (topic, partition)
        self.committed: dict[tuple[str, int], int] = {}
        self.retention = Retention(
            self.store, settings.adapter_keep_versions, settings.adapter_retention_grace_seconds
        )
        # the newest AdapterUpdated known on the topic per user (bounded, see the module)
        self._announced = Announcements()
        self._announcing: set[str] = set()  # users with an announcement not acknowledged yet
        self.outbox = Outbox(None, self.stats)  # every send, checked before offsets commit
        self.last_step_seconds = 0.0
        # Unusable records: skipped, counted (malformed) and copied to the dead-letter topic
        self.dead_letter = DeadLetter(settings.topic_dead_letter, settings.group_id, self.stats)
        config = self.lm.model.config
        self._vocab_size = int(config.vocab_size)
        self._context = getattr(config, "max_position_embeddings", None)
        self.pair_maker = PairMaker(self.preferences, self.lm.tokenizer, self._context)
        self.consumer: KafkaConsumer | None = None
        self.metrics = LearnerMetrics()  # served on /metrics by `loraloop learn`
        self.metrics.watch(self, "reinforce", self.lm.model_id)

    # --- Kafka --------------------------------------------------------------------------
    def connect(self) -> None:
        s = self.settings
        timeout_ms = int(s.kafka_connect_timeout * 1000)
        try:
            ensure_loraloop_topics(s, timeout=s.kafka_connect_timeout)
            self.consumer = KafkaConsumer(
                s.topic_interactions,
                s.topic_feedback,
                s.topic_adapter_updates,
                bootstrap_servers=s.kafka_bootstrap,
                group_id=s.group_id,
                enable_auto_commit=False,
                auto_offset_reset="earliest",
                client_id="loraloop-learner",
                bootstrap_timeout_ms=timeout_ms,
                # A killed learner's partitions move to a live one after this long (the
                # default 45 s left users without updates for about a minute).
                session_timeout_ms=int(s.learner_session_timeout_seconds * 1000),
                heartbeat_interval_ms=int(s.learner_session_timeout_seconds * 300),
            )

            def producer() -> KafkaProducer:
                return KafkaProducer(
                    bootstrap_servers=s.kafka_bootstrap,
                    acks="all",
                    enable_idempotence=True,
                    client_id="loraloop-learner",
                    bootstrap_timeout_ms=timeout_ms,
                )

            self.outbox = Outbox(producer, self.stats)
            self._restore_population()
            self._restore_deletions()
        except KafkaError as exc:
            raise KafkaUnavailableError(
                f"no Kafka broker answers at {s.kafka_bootstrap}: start one with "
                "`loraloop kafka` or set LORALOOP_KAFKA_BOOTSTRAP"
            ) from exc

    @property
    def producer(self) -> KafkaProducer | None:
        """The producer in use (the outbox replaces one that refused records)."""
        return self.outbox.producer

    def _restore_population(self) -> None:
        """Pick up the pooled bandit statistics where the last learner left them: those
        over this learner's context schema, under its key (population_key); other
        schemas' pools stay on the topic under theirs."""
        schema = self.schema
        for record in self._read_whole(self.settings.topic_bandit_state):
            if record.key == self._population_key.encode() and record.value is not None:
                msg = events_pb2.BanditState.FromString(record.value)
                ours = recorded_schema(msg.context_schema) == schema.fingerprint
                if not ours or msg.dim != schema.dim:
                    self.stats["bandit_schema_population"] += 1
                elif msg.seq > self.population.seq:
                    self.population = BanditState.from_proto(msg, self.arms)

    def _read_whole(self, topic: str) -> Iterator[Any]:
        """Every record of `topic` (a start-up read), with progress in the log; a read
        slower than LORALOOP_LEARNER_RESTORE_TIMEOUT_SECONDS is a KafkaUnavailableError."""
        s = self.settings
        timeout = s.learner_restore_timeout_seconds
        try:
            for n, record in enumerate(read_to_end(s.kafka_bootstrap, [topic], timeout), 1):
                if n % 100_000 == 0:
                    log.info("start-up: %d records of %s read", n, topic)
                yield record
        except TimeoutError as exc:
            raise KafkaUnavailableError(
                f"could not read {topic} to its end within {timeout:.0f} s at start-up "
                f"({exc}); raise LORALOOP_LEARNER_RESTORE_TIMEOUT_SECONDS"
            ) from exc

    def _restore_deletions(self) -> None:
        """Rebuild the deleted users' deletion times from the tombstones on the compacted
        adapter-updates topic, so a restarted learner drops their pre-deletion events that
        it has not consumed yet (or replays) exactly like its predecessor did. Also note
        the announcements past the group's committed position: a tombstone not processed
        yet may precede them (see learner/announcements.py)."""
        s = self.settings
        assert self.consumer is not None
        topic = s.topic_adapter_updates
        committed = {
            p: self.consumer.committed(TopicPartition(topic, p)) or 0
            for p in self.consumer.partitions_for_topic(topic) or ()
        }
        deletions: dict[str, int] = {}
        started = time.perf_counter()
        for record in self._read_whole(topic):
            self._restore_record(record, committed, deletions)
        self.deleted.rebuild(deletions.items())
        self.stats["deletions_restored"] = len(deletions)
        self.stats["deletions_forgotten"] = self.deleted.forgotten
        log.info(
            "%d deleted users restored from %s in %.2f s",
            len(deletions),
            topic,
            time.perf_counter() - started,
        )

    def _restore_record(
        self, record: Any, committed: dict[int, int], deletions: dict[str, int]
    ) -> None:
        if not record.key:
            return
        user_id = record.key.decode(errors="replace")
        if record.value is None:
            deletions[user_id] = max(deletion_time(record), deletions.get(user_id, 0))
        elif record.offset >= committed.get(record.partition, 0):
            try:
                version = events_pb2.AdapterUpdated.FromString(record.value).version
            except Exception:  # not ours to judge here; the consumer dead-letters nothing
                return
            self._announced.note(user_id, version, record.partition, record.offset)

    def close(self) -> None:
        if self._unwritten:  # not committed: a restart learns them again
            log.warning(
                "closing with %d versions unwritten (%d samples): they are learnt again "
                "after the restart",
                len(self._unwritten),
                sum(len(item.samples) for item in self._unwritten.values()),
            )
        if self.producer is not None:
            if not self.outbox.settle(timeout=10):
                log.warning("closing with %d records unacknowledged", self.outbox.unsettled)
            self.producer.close(timeout=10)
        if self.consumer is not None:
            self.consumer.close(autocommit=False)

    def run(self, stop: Any = None, poll_ms: int = 200) -> None:
        """Poll and process until `stop.is_set()` (a threading.Event) or forever."""
        if self.consumer is None:
            self.connect()
        assert self.consumer is not None
        while stop is None or not stop.is_set():
            polled = self.consumer.poll(timeout_ms=poll_ms, max_records=2000)
            self.process([r for batch in polled.values() for r in batch])
            self.metrics.observe_lag(self.consumer, committed=self.committed)

    # --- the commit order ---------------------------------------------------------------
    def process(self, records: Iterable[Any]) -> None:
        """1 join what arrived and close expired windows, 2 update every user with enough
        samples (one batched step per `max_users_per_step` users), 3 write each new
        version atomically (a version whose write failed is written again first, once its
        backoff is over, and its user's samples wait for it), 4 publish AdapterUpdated and
        bandit statistics and wait for Kafka's acks, 5 commit the offsets now fully
        applied, 6 delete the versions retention no longer needs."""
        self.outbox.retry()  # what Kafka refused last round goes out before anything new
        for record in records:
            self._ingest(record)
        for sample in self.joiner.expire():  # ("sum": windows closed with their feedback)
            if not self._rewarded(sample) and sample.replaced is None:  # nothing to learn
                self.joiner.release(sample.positions)
            else:
                self._ready_sample(sample)
        versions = self.stats["versions"]
        self._retry_writes()  # a user with a version still unwritten waits for it
        due = [
            u
            for u, samples in self._ready.items()
            if len(samples) >= self.settings.min_batch and u not in self._unwritten
        ]
        for i in range(0, len(due), self.max_users_per_step):
            self._update(due[i : i + self.max_users_per_step])
        self._publish_bandits()
        settled = self.outbox.settle(self.settings.learner_publish_timeout_seconds)
        if self.stats["versions"] != versions:
            pause_point("learner.before_commit")
        if settled:  # else: the commit waits until Kafka took all of it
            self._commit()
        self._retire()

    def _ingest(self, record: Any) -> None:
        s = self.settings
        pos = (record.topic, record.partition, record.offset)
        if record.topic == s.topic_adapter_updates:
            # A tombstone deletes its user; a failure to delete (a disk error) is not
            # skipped like a malformed record: it stops the learner, which replays it.
            # The learner's own tombstones only echo a deletion already done.
            if record.value is None and record.key and not from_learner(record):
                self._delete_user(
                    record.key.decode(errors="replace"),
                    deletion_time(record),
                    (record.partition, record.offset),
                )
            self.joiner.seen(pos)
            return
        try:
            if record.topic == s.topic_interactions:
                interaction = events_pb2.Interaction.FromString(record.value)
                _refuse(interaction_error(interaction, self._vocab_size, self._context))
                if not self._admissible(interaction, record, pos):
                    return
                sample = self.joiner.add_interaction(interaction, pos)
            elif record.topic == s.topic_feedback:
                feedback = events_pb2.FeedbackEvent.FromString(record.value)
                _refuse(feedback_error(feedback))
                if not self._admissible(feedback, record, pos):
                    return
                sample = self.joiner.add_feedback(feedback, pos)
            else:
                self.joiner.seen(pos)
                return
        except Exception as exc:  # garbage or an unusable event: skip, count, dead-letter
            self.stats["malformed"] += 1
            self.joiner.seen(pos)
            error = f"{type(exc).__name__}: {exc}"
            log.warning("malformed record at %s:%d@%d skipped (%s)", *pos, error)
            self.dead_letter.forward(self.producer, record, error)
            return
        if sample is not None:
            self._ready_sample(sample)

    def _ready_sample(self, sample: Sample) -> None:
        """Queue a joined sample for its user's next update, unless its interaction was
        stamped (at its request's start) at or before the user's deletion, or it was
        generated with another base model than this learner's (an interaction without a
        model_id is not checked)."""
        stamped = sample.interaction.timestamp_ms
        if stamped and self.deleted.predates_deletion(sample.user_id, stamped):
            self.stats["skipped_deleted"] += 1
            self.joiner.release(sample.positions)
            return
        model_id = sample.interaction.model_id
        if model_id and model_id != self.lm.model_id:
            self.stats["skipped_other_model"] += 1
            if self.stats["skipped_other_model"] == 1:
                log.warning(
                    "%s: interaction %s was generated with base model %r, this learner "
                    "trains %r: skipped (and so are the next ones, counted)",
                    sample.user_id,
                    sample.request_id,
                    model_id[:200],
                    self.lm.model_id,
                )
            self.joiner.release(sample.positions)
            return
        self._ready[sample.user_id].append(sample)

    def _admissible(self, event: Any, record: Any, pos: tuple[str, int, int]) -> bool:
        """Raises ValueError (counted as malformed) for a user_id that could not name a
        store directory; False, the record skipped, for an event from before its user's
        deletion (it must not bring the user back)."""
        error = user_id_error(event.user_id)
        if error:
            raise ValueError(error)
        stamped = event.timestamp_ms or int(record.timestamp or 0)
        if self.deleted.predates_deletion(event.user_id, stamped):
            self.stats["skipped_deleted"] += 1
            self.joiner.seen(pos)
            return False
        return True

    def _rewarded(self, sample: Sample) -> bool:
        """Whether the sample has a reward: feedback, or the default reward standing in.
        One without is queued only for the preference pair it carries (a regenerate)."""
        return sample.feedback is not None or self.settings.default_reward is not None

    def _reward(self, sample: Sample) -> float:
        """The sample's reward: of its feedback ("sum": the rewards of all its feedback
        added, clipped to [-1, 1]), or the default reward when none came."""
        if sample.feedback is None:
            self.stats["default_rewards"] += 1
            return float(self.settings.default_reward or 0.0)
        total = sum(reward(f.signals, self.rewards) for f in sample.feedbacks)
        return max(-1.0, min(1.0, total))

    def _learn_bandit(self, model: UserModel, sample: Sample, r: float) -> None:
        arm, x = sample.interaction.arm, np.array(sample.interaction.context, dtype=float)
        if not arm:  # no arm was applied to the request (it set the arms' levers itself)
            self.stats["no_arm"] += 1
            return
        logged_under = recorded_schema(sample.interaction.context_schema)
        if logged_under != self.schema.fingerprint or len(x) != self.schema.dim:
            self._schema_mismatch(sample.user_id, logged_under, sample)
            return
        if arm not in model.bandit.stats:
            self.stats["unknown_arms"] += 1
            return
        model.bandit.update(arm, x, r)
        self.population.update(arm, x, r)
        self._bandit_dirty.update({model.user_id, self._population_key})

    def _schema_mismatch(self, user_id: str, schema: str, sample: Sample | None = None) -> None:
        """Statistics (a user's, set aside by UserModels) or a sample's context over
        another context schema than the learner's: counted, logged once per kind."""
        key = "bandit_schema_samples" if sample is not None else "bandit_schema_set_aside"
        self.stats[key] += 1
        if sample is not None and self.stats[key] == 1:
            log.warning(
                "%s: interaction %s has a context of schema %s (%d values), this learner "
                "uses %s, %s: the bandit does not learn from it, the adapter does (logged "
                "once, counted in loraloop_learner_bandit_schema_mismatch_total); give the "
                "servers the learner's context_schema_file",
                user_id,
                sample.request_id,
                schema[:80],
                len(sample.interaction.context),
                self.schema.fingerprint,
                self.schema.describe(),
            )

    def _update(self, user_ids: list[str]) -> None:
        batches, models, kept, pair_batches = [], [], [], []
        for user_id in user_ids:
            samples = self._ready.pop(user_id)
            model = self.users.get(user_id)
            applied = set(model.applied)
            fresh = []
            for s in samples:
                replayed = model.offsets.contains(s.interaction_position)
                if replayed or s.request_id in applied:
                    self.stats["skipped_applied"] += 1
                    # learnt from at another position: a copy of the event (at-least-once
                    # delivery) that came after the joiner forgot the original
                    self.stats["skipped_duplicate"] += not replayed
                    self.joiner.release(s.positions)
                else:
                    fresh.append(s)
            if len(fresh) < len(samples):
                self._reannounce(model)  # a replay: its last version may not be announced
            if not fresh:
                continue
            rewarded = [s for s in fresh if self._rewarded(s)]
            rewards = [self._reward(s) for s in rewarded]
            # work on copies: the cached model changes only once its version is written
            model = dataclasses.replace(
                model, bandit=copy.deepcopy(model.bandit), guard=copy.deepcopy(model.guard)
            )
            for s, r in zip(rewarded, rewards, strict=True):
                self._learn_bandit(model, s, r)
            trainable = [
                i
                for i, s in enumerate(rewarded)
                if s.interaction.response_token_ids and self.preferences.mode != "preference"
            ]
            pairs = [p for s in fresh for p in self.pair_maker.pairs(s)]
            kept.append((fresh, rewards))
            models.append(model)
            batches.append(
                UserBatch(
                    weights=model.weights,
                    adam=model.adam,
                    baseline=model.baseline,
                    prompts=[list(rewarded[i].interaction.prompt_token_ids) for i in trainable],
                    responses=[list(rewarded[i].interaction.response_token_ids) for i in trainable],
                    rewards=[rewards[i] for i in trainable],
                    behaviour=[list(rewarded[i].interaction.behaviour_logprobs) for i in trainable],
                    temperatures=[rewarded[i].interaction.sampling.temperature for i in trainable],
                    top_ps=[rewarded[i].interaction.sampling.top_p for i in trainable],
                )
            )
            pair_batches.append(
                PairBatch(
                    [p.prompt for p in pairs],
                    [p.chosen for p in pairs],
                    [p.rejected for p in pairs],
                )
            )
        if not batches:
            return
        started = time.perf_counter()
        stepped = [k for k, b in enumerate(batches) if b.rewards or pair_batches[k]]
        users = [batches[k] for k in stepped]
        if self.preferences.mode == "reward":
            results: list[Any] = reinforce_step(self.lm, users, self.algo) if users else []
        else:
            with_pairs = [pair_batches[k] for k in stepped]
            results = (
                preference_step(self.lm, users, with_pairs, self.algo, self.dpo) if users else []
            )
        self.last_step_seconds = time.perf_counter() - started
        self.metrics.observe_step(self.last_step_seconds, users)
        pause_point("learner.after_step")
        updates = iter(results)
        self.stats["updates"] += 1
        for k, (model, (samples, rewards)) in enumerate(zip(models, kept, strict=True)):
            upd = next(updates) if k in stepped else None
            if upd is not None:
                self.metrics.observe_update(upd)
            self._apply(model, samples, rewards, upd)

    def _apply(
        self, model: UserModel, samples: list[Sample], rewards: list[float], upd: Any
    ) -> None:
        """Guard, then write the user's next version and announce it."""
        kl = upd.kl if upd is not None else 0.0
        reason = guard.check(model.guard, kl, self.guard)
        if reason is not None:
            target = model.guard.best_version
            weights = self.users.weights_of(model.user_id, target)
            new = dataclasses.replace(
                model,
                weights=weights,
                adam=AdamState(),
                rollbacks=model.rollbacks + 1,
                guard=guard.GuardState(best_mean=model.guard.best_mean, best_version=target),
            )
            self.stats["rollbacks"] += 1
            log.warning("%s rolled back to v%d (%s guard)", model.user_id, target, reason)
        else:
            new = dataclasses.replace(model)
            if upd is not None:
                new.weights, new.baseline = upd.weights, upd.baseline
            guard.record(new.guard, rewards, model.version, self.guard)
        new.updates = model.updates + 1
        new.applied = model.applied + [s.request_id for s in samples]
        positions = [s.interaction_position for s in samples]
        # Every interaction below the partition's safe commit point is done (this batch's
        # are still held, so the floor stays below them): recorded with the weights.
        new.offsets = model.offsets.with_applied(positions, self.joiner.commit_offsets())
        new.learnt_from = [
            (s.request_id, position_text(p)) for s, p in zip(samples, positions, strict=True)
        ]
        self._write(_Unwritten(new, samples, rewards, upd, reason))

    def _write(self, item: _Unwritten) -> None:
        """Write the user's next version and announce it. A failed write (a full disk, an
        I/O error) is counted by reason and kept to be written again, unchanged, after a
        backoff; its samples stay held meanwhile, so no offset is committed past them."""
        user_id = item.model.user_id
        try:
            stored = self._store(item)
        except Exception as exc:
            self._write_failed(item, exc)
            return
        if self._unwritten.pop(user_id, None) is not None:
            self._bandit_dirty.add(user_id)  # its statistics were held back meanwhile
            log.warning(
                "%s v%d written after %d failed tries", user_id, stored.version, item.failures
            )
        pause_point("learner.after_write")
        self._publish_update(stored, item.upd, len(item.samples), item.rewards, item.rollback)
        for s in item.samples:
            self.joiner.release(s.positions)
        self.stats["versions"] += 1
        self.stats["samples"] += len(item.samples)
        self.stats["pairs"] += getattr(item.upd, "pairs", 0)

    def _store(self, item: _Unwritten) -> AdapterVersion:
        """`users.commit`; when the version is there already, the one an earlier try of
        this write left in place (renamed, then a later step failed) if it holds these
        samples, else VersionTakenError."""
        model = item.model
        version = model.version + 1
        if self.store.has_version(model.user_id, version):
            if item.failures:
                state = self.store.learner_state(model.user_id, version)
                offsets = AppliedOffsets.from_json(state.get("applied_offsets"))
                if all(offsets.contains(s.interaction_position) for s in item.samples):
                    self.store.sync_user(model.user_id)  # what the try did not
                    return self.users.adopt(model, self.store.get(model.user_id, version))
            raise VersionTakenError(f"{model.user_id} v{version} was written by another writer")
        return self.users.commit(model, self.lm.model_id, self.settings.lora_targets)

    def _write_failed(self, item: _Unwritten, exc: Exception) -> None:
        user_id, version = item.model.user_id, item.model.version + 1
        reason = write_failure_reason(exc)
        self.write_failures[reason] += 1
        if isinstance(exc, VersionTakenError):
            # Another learner wrote this version (a rebalance): learn these samples again
            # on top of the newest version (those it holds are skipped as applied).
            self._unwritten.pop(user_id, None)
            self.users.forget(user_id)
            self._ready[user_id][:0] = item.samples
            log.warning("%s; %d samples learnt again on top of it", exc, len(item.samples))
            return
        item.failures += 1
        pause = min(WRITE_RETRY_MAX_S, WRITE_RETRY_FIRST_S * 2 ** (item.failures - 1))
        item.next_try = time.monotonic() + pause
        first = user_id not in self._unwritten
        self._unwritten[user_id] = item
        log.log(
            logging.ERROR if first else logging.WARNING,
            "writing %s v%d failed (%s, try %d: %s): its %d samples are kept and the write "
            "is tried again in %.1f s; offsets are not committed past them",
            user_id,
            version,
            reason,
            item.failures,
            exc,
            len(item.samples),
            pause,
            exc_info=first and not isinstance(exc, OSError),
        )

    def _retry_writes(self) -> None:
        """Write again the versions whose backoff is over."""
        now = time.monotonic()
        for item in [i for i in self._unwritten.values() if i.next_try <= now]:
            self._write(item)

    def _retire(self) -> None:
        """Delete the versions retention lets go (loraloop/core/adapters/retention.py)."""
        for user_id in sorted(self.retention.ripe()):
            try:
                removed = self.retention.prune(user_id)
            except (OSError, AdapterStoreError) as exc:
                self.stats["retention_failed"] += 1
                log.warning("deleting old versions of %s failed: %s", user_id, exc)
                continue
            self.stats["versions_retired"] += len(removed)
            if removed:
                log.info("%s: v%s deleted (retention)", user_id, ",".join(map(str, removed)))

    def _publish_update(
        self, stored: Any, upd: Any, n: int, rewards: list[float], rollback: str | None
    ) -> None:
        metrics = events_pb2.UpdateMetrics(
            samples=n,
            mean_reward=sum(rewards) / len(rewards) if rewards else 0.0,
            rolled_back=rollback or "",
        )
        if upd is not None:
            metrics.mean_advantage, metrics.loss = upd.mean_advantage, upd.loss
            metrics.grad_norm, metrics.baseline, metrics.kl = upd.grad_norm, upd.baseline, upd.kl
            metrics.pairs = getattr(upd, "pairs", 0)
            metrics.preference_loss = getattr(upd, "preference_loss", 0.0)
        self._announce(stored, metrics)
        log.info(
            "%s -> v%d (reward %.2f, kl %.4f, %d samples%s)",
            stored.user_id,
            stored.version,
            metrics.mean_reward,
            metrics.kl,
            n,
            f", rolled back: {rollback}" if rollback else "",
        )

    def _announce(self, stored: Any, metrics: events_pb2.UpdateMetrics) -> None:
        event = events_pb2.AdapterUpdated(
            user_id=stored.user_id,
            version=stored.version,
            uri=stored.uri,
            checksum=stored.checksum,
            base_model_id=self.lm.model_id,
            timestamp_ms=int(time.time() * 1000),
            metrics=metrics,
        )
        user_id, version = stored.user_id, stored.version

        def acknowledged(meta: Any) -> None:
            self._announced.note(user_id, version, meta.partition, meta.offset)
            self._announcing.discard(user_id)
            self.retention.acknowledged(user_id, version)

        self._announcing.add(user_id)

        self.outbox.send(
            Outgoing(
                self.settings.topic_adapter_updates,
                user_id.encode(),
                event.SerializeToString(),
                f"AdapterUpdated {user_id} v{version}",
                on_ack=acknowledged,
            )
        )

    def _reannounce(self, model: UserModel) -> None:
        """Announce a user's newest stored version again, once per process: a learner
        killed between writing a version and announcing it leaves serving unaware of it,
        and its replay is the only sign. Serving ignores versions it already has."""
        if model.version == 0 or self._announced.announced(model.user_id, model.version):
            return
        if model.user_id in self._announcing:
            return  # its acknowledgement is still on the way
        try:
            stored = self.store.get(model.user_id, model.version)
        except (ValueError, AdapterStoreError) as exc:  # gone or incomplete: nothing to say
            log.warning("cannot re-announce %s v%d: %s", model.user_id, model.version, exc)
            return
        self._announce(stored, events_pb2.UpdateMetrics())
        self.stats["reannounced"] += 1
        log.info("%s v%d announced again after a replay", model.user_id, model.version)

    def _unreadable(self, user_id: str, version: int) -> None:
        self.stats["unreadable_versions"] += 1

    def _publish_bandits(self) -> None:
        if self.producer is None or not self._bandit_dirty:
            self._bandit_dirty.clear()
            return
        now = int(time.time() * 1000)
        # a user whose version is unwritten is published once it is written
        for key in sorted(self._bandit_dirty - self._unwritten.keys()):
            state = self.population if key == self._population_key else self.users.get(key).bandit
            self.outbox.send(
                Outgoing(
                    self.settings.topic_bandit_state,
                    key.encode(),
                    state.to_proto(key, now).SerializeToString(),
                    f"bandit state {key}",
                )
            )
        self._bandit_dirty.clear()

    def _delete_user(
        self, user_id: str, deleted_at_ms: int = 0, where: tuple[int, int] | None = None
    ) -> None:
        """Forget everything of a user: queued samples, cached model, stored versions.

        `where` is the (partition, offset) of the server's tombstone on adapter-updates.
        When one of the user's announcements follows it there (a version learnt from
        samples consumed before the tombstone), the learner sends a tombstone of its own,
        marked as such and stamped with the same deletion time, so the user's last record
        on the compacted topic is a tombstone again; it sends one too when it cannot tell
        (the announcement forgotten) but had versions to remove. On bandit-state, whose
        position it cannot compare, it always answers the deletion with a tombstone. It
        ignores its own tombstones when it consumes them."""
        if user_id_error(user_id):
            return
        deleted_at_ms = deleted_at_ms or int(time.time() * 1000)
        self.deleted.record(user_id, deleted_at_ms)
        self.stats["deletions_forgotten"] = self.deleted.forgotten
        # Queued samples (and those of a version whose write failed) from before the
        # deletion are done with; later ones are learnt on a new v1, as after a restart.
        unwritten = self._unwritten.pop(user_id, None)
        queued = self._ready.pop(user_id, []) + (unwritten.samples if unwritten else [])
        later = []
        for s in queued:
            stamped = s.interaction.timestamp_ms
            if stamped and not self.deleted.predates_deletion(user_id, stamped):
                later.append(s)
            else:
                self.joiner.release(s.positions)
        if later:
            self._ready[user_id] = later
        self._bandit_dirty.discard(user_id)
        self.retention.forget(user_id)
        self.joiner.forget_user(user_id)
        self.users.drop_user(user_id)
        removed = self.store.delete_user(user_id)
        after = self._announced.after(user_id, *where) if where is not None else None
        echo = removed if after is None else after
        echo = echo or user_id in self._announcing  # in flight: its offset is not known yet
        self._announced.discard(user_id)
        self._announcing.discard(user_id)
        key = user_id.encode()
        self.outbox.forget(key)
        headers = learner_tombstone_headers(deleted_at_ms)
        topics = [self.settings.topic_bandit_state]
        if echo:
            topics.append(self.settings.topic_adapter_updates)
        for topic in topics:
            self.outbox.send(
                Outgoing(
                    topic,
                    key,
                    None,
                    f"tombstone {user_id} on {topic}",
                    headers=headers,
                    timestamp_ms=deleted_at_ms,
                )
            )
        self.stats["deleted_users"] += int(removed)

    def _commit(self) -> None:
        if self.consumer is None:
            return
        offsets = {
            TopicPartition(topic, part): OffsetAndMetadata(offset, "", -1)
            for (topic, part), offset in self.joiner.commit_offsets().items()
        }
        if offsets:
            try:
                self.consumer.commit(offsets)
            except KafkaError as exc:  # replay is safe: applied samples are skipped
                log.warning("offset commit failed (%s); will retry", exc)
                return
            self.committed.update({(tp.topic, tp.partition): o.offset for tp, o in offsets.items()})
