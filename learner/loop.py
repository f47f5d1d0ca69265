"""The online learner: consume → join → reward → update → store → publish → commit.

`Learner.process` is the commit order, top to bottom. Offsets are committed only after
every sample they cover has been written to the store and its AdapterUpdated
acknowledged by Kafka, and each version records the request_ids it learnt from, so a
crash at any point replays events without applying any of them twice.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections import defaultdict
from collections.abc import Iterable
from typing import Any

from kafka import KafkaConsumer, KafkaProducer, OffsetAndMetadata, TopicPartition
from kafka.errors import KafkaError

from core.adapter_store import AdapterStore
from core.gen.loraloop.v1 import events_pb2
from core.kafka.broker import ensure_loraloop_topics
from core.model_loading import LoadedModel, load_model
from core.settings import Settings
from learner.algos.reinforce import ReinforceConfig, UserBatch, reinforce_step
from learner.joiner import Joiner, Sample
from learner.metrics import LearnerMetrics
from learner.rewards import RewardConfig, reward
from learner.user_models import UserModels

log = logging.getLogger(__name__)


class KafkaUnavailableError(RuntimeError):
    """The learner cannot work without Kafka: say so and how to fix it."""


class Learner:
    def __init__(self, settings: Settings, max_users_per_step: int = 32) -> None:
        self.settings = settings
        self.lm: LoadedModel = load_model(settings, slots=max_users_per_step + 1)
        self.store = AdapterStore(settings.adapter_store)
        self.users = UserModels(self.store, self.lm.bank, settings.seed)
        self.joiner = Joiner(settings.reward_wait_seconds)
        self.algo = ReinforceConfig(
            learning_rate=settings.learning_rate,
            max_grad_norm=settings.max_grad_norm,
            baseline_decay=settings.baseline_decay,
            kl_coef=settings.kl_coef,
        )
        self.rewards = RewardConfig()
        self.max_users_per_step = max_users_per_step
        self._ready: dict[str, list[Sample]] = defaultdict(list)
        self.stats = {
            "updates": 0,
            "versions": 0,
            "samples": 0,
            "skipped_applied": 0,
            "malformed": 0,
            "deleted_users": 0,
        }
        self.consumer: KafkaConsumer | None = None
        self.producer: KafkaProducer | None = None
        self.metrics = LearnerMetrics()  # served on /metrics by `loraloop learn`
        self.metrics.watch(self, "reinforce", self.lm.model_id)

    # --- Kafka --------------------------------------------------------------------------
    def connect(self) -> None:
        s = self.settings
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
                bootstrap_timeout_ms=int(s.kafka_connect_timeout * 1000),
            )
            self.producer = KafkaProducer(
                bootstrap_servers=s.kafka_bootstrap,
                acks="all",
                enable_idempotence=True,
                client_id="loraloop-learner",
                bootstrap_timeout_ms=int(s.kafka_connect_timeout * 1000),
            )
        except KafkaError as exc:
            raise KafkaUnavailableError(
                f"no Kafka broker answers at {s.kafka_bootstrap}: start one with "
                "`loraloop kafka` or set LORALOOP_KAFKA_BOOTSTRAP"
            ) from exc

    def close(self) -> None:
        if self.producer is not None:
            self.producer.flush(timeout=10)
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
            records = [r for batch in polled.values() for r in batch]
            self.process(records)
            self.metrics.observe_lag(self.consumer)

    # --- the commit order ---------------------------------------------------------------
    def process(self, records: Iterable[Any]) -> None:
        """1 join what arrived, 2 update every user with enough samples (one batched step
        per `max_users_per_step` users), 3 write each new version atomically, 4 publish
        AdapterUpdated and wait for Kafka's ack, 5 commit the offsets now fully applied."""
        for record in records:
            self._ingest(record)
        self.joiner.expire()
        due = [u for u, samples in self._ready.items() if len(samples) >= self.settings.min_batch]
        for i in range(0, len(due), self.max_users_per_step):
            self._update(due[i : i + self.max_users_per_step])
        if self.producer is not None:
            self.producer.flush(timeout=30)
        self._commit()

    def _ingest(self, record: Any) -> None:
        s = self.settings
        pos = (record.topic, record.partition, record.offset)
        try:
            if record.topic == s.topic_adapter_updates:
                if record.value is None and record.key is not None:
                    self._delete_user(record.key.decode())
                self.joiner.seen(pos)
                return
            if record.topic == s.topic_interactions:
                sample = self.joiner.add_interaction(
                    events_pb2.Interaction.FromString(record.value), pos
                )
            elif record.topic == s.topic_feedback:
                sample = self.joiner.add_feedback(
                    events_pb2.FeedbackEvent.FromString(record.value), pos
                )
            else:
                self.joiner.seen(pos)
                return
        except Exception:  # protobuf DecodeError or garbage: skip and count, never crash
            self.stats["malformed"] += 1
            self.joiner.seen(pos)
            log.warning("malformed record at %s:%d@%d skipped", *pos)
            return
        if sample is not None:
            self._ready[sample.user_id].append(sample)

    def _update(self, user_ids: list[str]) -> None:
        batches, models, kept = [], [], []
        for user_id in user_ids:
            samples = self._ready.pop(user_id)
            model = self.users.get(user_id)
            fresh = [s for s in samples if s.request_id not in set(model.applied)]
            self.stats["skipped_applied"] += len(samples) - len(fresh)
            for s in samples:
                if s not in fresh:
                    self.joiner.release(s.positions)
            if not fresh:
                continue
            fresh = [s for s in fresh if s.interaction.response_token_ids]
            if not fresh:
                continue
            kept.append(fresh)
            models.append(model)
            batches.append(
                UserBatch(
                    weights=model.weights,
                    adam=model.adam,
                    baseline=model.baseline,
                    prompts=[list(s.interaction.prompt_token_ids) for s in fresh],
                    responses=[list(s.interaction.response_token_ids) for s in fresh],
                    rewards=[reward(s.feedback.signals, self.rewards) for s in fresh],
                )
            )
        if not batches:
            return
        started = time.perf_counter()
        updates = reinforce_step(self.lm, batches, self.algo)
        self.metrics.observe_step(time.perf_counter() - started, batches)
        for upd in updates:
            self.metrics.observe_update(upd)
        self.stats["updates"] += 1
        for model, samples, upd in zip(models, kept, updates, strict=True):
            new = dataclasses.replace(
                model,
                weights=upd.weights,
                baseline=upd.baseline,
                updates=model.updates + 1,
                applied=model.applied + [s.request_id for s in samples],
            )
            try:
                stored = self.users.commit(new, self.lm.model_id, self.settings.lora_targets)
            except Exception:
                self.users.forget(model.user_id)  # reload from the store next time
                log.exception(
                    "writing %s's new version failed; samples will be replayed", model.user_id
                )
                continue
            self._publish(
                stored.user_id, stored.version, stored.uri, stored.checksum, upd, len(samples)
            )
            for s in samples:
                self.joiner.release(s.positions)
            self.stats["versions"] += 1
            self.stats["samples"] += len(samples)

    def _publish(
        self, user_id: str, version: int, uri: str, checksum: str, upd: Any, n: int
    ) -> None:
        event = events_pb2.AdapterUpdated(
            user_id=user_id,
            version=version,
            uri=uri,
            checksum=checksum,
            base_model_id=self.lm.model_id,
            timestamp_ms=int(time.time() * 1000),
            metrics=events_pb2.UpdateMetrics(
                samples=n,
                mean_reward=upd.mean_reward,
                mean_advantage=upd.mean_advantage,
                loss=upd.loss,
                grad_norm=upd.grad_norm,
                baseline=upd.baseline,
            ),
        )
        if self.producer is not None:
            self.producer.send(
                self.settings.topic_adapter_updates,
                key=user_id.encode(),
                value=event.SerializeToString(),
            )
        log.info(
            "%s -> v%d (reward %.2f, kl %.4f, %d samples)",
            user_id,
            version,
            upd.mean_reward,
            upd.kl,
            n,
        )

    def _delete_user(self, user_id: str) -> None:
        self._ready.pop(user_id, None)
        self.joiner.forget_user(user_id)
        self.users.forget(user_id)
        try:
            self.store.delete_user(user_id)
        except ValueError:
            return
        self.stats["deleted_users"] += 1

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
