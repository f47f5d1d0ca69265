"""Kafka admin helpers that the server, the learner and the tools share: wait for a broker,
create loraloop's topics (replicated as the settings say, and checked against the cluster),
read a topic's configuration. Works against any Kafka cluster."""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import socket
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, TypeVar

from kafka import KafkaAdminClient
from kafka.admin import ConfigResource, ConfigResourceType
from kafka.errors import (
    KafkaConnectionError,
    NodeNotReadyError,
    RequestTimedOutError,
    TopicAlreadyExistsError,
    for_code,
)

from loraloop.core.settings import Settings, StartupError

__all__ = [
    "TOMBSTONE_RETENTION_MS",
    "KafkaReplicationError",
    "create_topics",
    "ensure_loraloop_topics",
    "live_broker_ids",
    "partition_replicas",
    "ready_cluster_id",
    "topic_configs",
    "wait_for_kafka",
]

log = logging.getLogger(__name__)
TOMBSTONE_RETENTION_MS = 7 * 24 * 3600 * 1000
_T = TypeVar("_T")
# What an admin request sent to a broker that is down fails with: kafka-python's admin
# client sends each request to one broker and does not try another, but it backs off
# from the one that failed, so asking again goes to a live one.
_OTHER_BROKER = (KafkaConnectionError, NodeNotReadyError, RequestTimedOutError)


def _ask(call: Callable[[], _T], attempts: int = 4) -> _T:
    """`call()`, asked again (another broker) when the broker it went to is down."""
    for attempt in range(1, attempts + 1):
        try:
            return call()
        except _OTHER_BROKER as exc:
            if attempt == attempts:
                raise
            log.debug("Kafka admin request failed (%s); asking another broker", exc)
            time.sleep(0.1 * attempt)
    raise AssertionError("unreachable")


class KafkaReplicationError(StartupError, ValueError):
    """The cluster cannot hold loraloop's topics at the configured replication factor: fewer
    brokers than replicas, or an existing topic with fewer replicas (a start-up error)."""


def _split_bootstrap(bootstrap: str) -> list[tuple[str, int]]:
    out = []
    for item in bootstrap.split(","):
        host, _, port = item.strip().rpartition(":")
        out.append((host.strip("[]") or "localhost", int(port or 9092)))
    return out


def _tcp_open(bootstrap: str, timeout: float = 0.5) -> bool:
    """True when some bootstrap address accepts a TCP connection."""
    for host, port in _split_bootstrap(bootstrap):
        with contextlib.suppress(OSError), socket.create_connection((host, port), timeout):
            return True
    return False


@contextlib.contextmanager
def _admin(bootstrap: str, timeout: float = 10.0) -> Iterator[KafkaAdminClient]:
    """A KafkaAdminClient that is closed afterwards, even when bootstrapping fails.

    kafka-python starts its IO thread before bootstrapping in `__init__`, and leaks it when the
    bootstrap times out; construct in two steps so that thread is stopped on failure too.
    """
    ms = max(int(timeout * 1000), 500)
    admin = KafkaAdminClient.__new__(KafkaAdminClient)
    try:
        admin.__init__(
            bootstrap_servers=bootstrap,
            client_id="loraloop-admin",
            bootstrap_timeout_ms=ms,
            request_timeout_ms=ms,
        )
    except BaseException:
        admin._closed = False
        with contextlib.suppress(Exception):
            admin.close()
        raise
    try:
        yield admin
    finally:
        admin.close()


def ready_cluster_id(bootstrap: str, timeout: float) -> str | None:
    """Cluster id once an unfenced broker answers at `bootstrap`, else None."""
    if not _tcp_open(bootstrap):
        return None
    try:
        with _admin(bootstrap, timeout) as admin:
            info = admin.describe_cluster()
    except Exception as exc:
        log.debug("Kafka at %s not ready yet: %s", bootstrap, exc)
        return None
    if not any(not b.get("is_fenced", False) for b in info.get("brokers", [])):
        return None
    return str(info.get("cluster_id") or "")


def live_broker_ids(bootstrap: str, timeout: float) -> list[int]:
    """Ids of the brokers the cluster at `bootstrap` counts as live (registered, unfenced);
    empty when no broker answers."""
    if not _tcp_open(bootstrap):
        return []
    try:
        with _admin(bootstrap, timeout) as admin:
            brokers = _ask(admin.describe_cluster).get("brokers", [])
    except Exception as exc:
        log.debug("Kafka at %s does not answer: %s", bootstrap, exc)
        return []
    return sorted(int(b["broker_id"]) for b in brokers if not b.get("is_fenced", False))


def wait_for_kafka(bootstrap: str, timeout: float = 30.0) -> bool:
    """Wait until a broker at `bootstrap` serves admin requests; False after `timeout` s."""
    deadline = time.monotonic() + timeout
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return False
        if ready_cluster_id(bootstrap, min(max(remaining, 0.5), 5.0)) is not None:
            return True
        time.sleep(min(0.2, max(deadline - time.monotonic(), 0)))


def _config_value(value: Any) -> str:
    return str(value).lower() if isinstance(value, bool) else str(value)


def _described(admin: KafkaAdminClient, names: list[str], wait: float = 10.0) -> list[Any]:
    """describe_topics of existing topics, asked again (for up to `wait` s) while the broker
    asked lists one with no partitions yet: a topic just created elsewhere, whose metadata
    has not reached that broker (its replicas would go unchecked)."""
    deadline = time.monotonic() + wait
    while True:
        described = _ask(lambda: admin.describe_topics(names)) if names else []
        if all(t.get("partitions") for t in described) or time.monotonic() > deadline:
            return list(described)
        time.sleep(0.2)


def _check_replication(
    admin: KafkaAdminClient,
    bootstrap: str,
    names: Sequence[str],
    replication_factor: int,
    min_insync_replicas: int | None,
) -> None:
    """Refuse (KafkaReplicationError) when topics at `replication_factor` cannot be had:
    a topic must be created and the cluster has fewer brokers, or an existing topic has
    fewer replicas. Brokers down (fenced) under a cluster big enough only warn: that is a
    degraded cluster, not a misconfigured one, and Kafka itself says whether writes go on
    (min.insync.replicas)."""
    brokers = _ask(admin.describe_cluster).get("brokers", [])
    live = [b for b in brokers if not b.get("is_fenced", False)]
    existing = set(_ask(admin.list_topics)) & set(names)
    missing = sorted(set(names) - existing)
    if missing and len(brokers) < replication_factor:
        raise KafkaReplicationError(
            f"LORALOOP_KAFKA_REPLICATION_FACTOR={replication_factor}, but the Kafka cluster at "
            f"{bootstrap} has {len(brokers)} broker(s): topics {missing} cannot be created "
            f"with {replication_factor} replicas; add brokers, or lower the replication "
            "factor (and LORALOOP_KAFKA_MIN_INSYNC_REPLICAS) to what the cluster has"
        )
    under = {}
    described = _described(admin, sorted(existing))
    for topic in described:
        replicas = [len(part.get("replica_nodes", ())) for part in topic.get("partitions", ())]
        if replicas and min(replicas) < replication_factor:
            under[str(topic.get("name"))] = min(replicas)
    if under:
        raise KafkaReplicationError(
            f"LORALOOP_KAFKA_REPLICATION_FACTOR={replication_factor}, but existing topics at "
            f"{bootstrap} have fewer replicas: {under}; add replicas with "
            "kafka-reassign-partitions, or lower the replication factor"
        )
    if len(live) < replication_factor:
        log.warning(
            "only %d of the %d Kafka brokers at %s are up, fewer than the replication factor "
            "%d: the cluster runs degraded",
            len(live),
            len(brokers),
            bootstrap,
            replication_factor,
        )
    if min_insync_replicas is not None and existing:
        resources = [ConfigResource(ConfigResourceType.TOPIC, t) for t in sorted(existing)]
        answer = _ask(lambda: admin.describe_configs(resources, config_filter="all"))
        configs = answer.get("topic", {})
        for topic, entries in sorted(configs.items()):
            value = entries.get("min.insync.replicas", {}).get("value")
            if value is not None and int(value) < min_insync_replicas:
                log.warning(
                    "topic %s has min.insync.replicas=%s, below "
                    "LORALOOP_KAFKA_MIN_INSYNC_REPLICAS=%d (existing topics are not altered: "
                    "kafka-configs --alter --add-config min.insync.replicas=%d)",
                    topic,
                    value,
                    min_insync_replicas,
                    min_insync_replicas,
                )


def create_topics(
    bootstrap: str,
    topics: Mapping[str, Mapping[str, Any]] | Sequence[str],
    partitions: int = 4,
    timeout: float = 30.0,
    replication_factor: int = 1,
    min_insync_replicas: int | None = None,
) -> list[str]:
    """Create topics that do not exist yet and wait until every one has leaders.

    `topics` is a list of names or a mapping of name -> topic-level Kafka configs (e.g.
    `{"adapter-updates": {"cleanup.policy": "compact"}}`); every topic gets `partitions`
    partitions, `replication_factor` replicas and, when given, `min.insync.replicas`.
    Existing topics are left untouched. Above one replica the cluster is checked first
    (KafkaReplicationError: fewer brokers than replicas, or an existing topic with fewer
    replicas). Returns the names actually created.
    """
    if isinstance(topics, str):
        topics = [topics]
    specs: dict[str, Mapping[str, Any]] = (
        dict(topics) if isinstance(topics, Mapping) else {name: {} for name in topics}
    )
    if not specs:
        return []
    extra = {} if min_insync_replicas is None else {"min.insync.replicas": min_insync_replicas}
    request = {
        name: {
            "num_partitions": partitions,
            "replication_factor": replication_factor,
            "configs": {k: _config_value(v) for k, v in {**extra, **cfg}.items()},
        }
        for name, cfg in specs.items()
    }
    created: list[str] = []
    with _admin(bootstrap, timeout) as admin:
        if replication_factor > 1:
            _check_replication(
                admin, bootstrap, list(specs), replication_factor, min_insync_replicas
            )
        result = _ask(
            lambda: admin.create_topics(request, timeout_ms=int(timeout * 1000), raise_errors=False)
        )
        for topic in result["topics"]:
            error = for_code(topic["error_code"])
            if topic["error_code"] == 0:
                created.append(topic["name"])
            elif error is not TopicAlreadyExistsError:
                raise error(f"creating topic {topic['name']!r}: {topic.get('error_message')}")
        admin.wait_for_topics(list(specs), timeout_ms=int(timeout * 1000))
    return created


@dataclasses.dataclass(frozen=True)
class PartitionReplicas:
    """Where one partition lives: its leader, its replicas and those in sync."""

    partition: int
    leader: int
    replicas: tuple[int, ...]
    in_sync: tuple[int, ...]


def partition_replicas(
    bootstrap: str, topic: str, timeout: float = 10.0
) -> list[PartitionReplicas]:
    """The leader, replicas and in-sync replicas of each partition of `topic` (asking
    another broker when one is down)."""
    with _admin(bootstrap, timeout) as admin:
        (described,) = _ask(lambda: admin.describe_topics([topic]))
    return sorted(
        (
            PartitionReplicas(
                int(p["partition_index"]),
                int(p["leader_id"]),
                tuple(p["replica_nodes"]),
                tuple(p["isr_nodes"]),
            )
            for p in described.get("partitions", ())
        ),
        key=lambda p: p.partition,
    )


def topic_configs(bootstrap: str, topic: str, timeout: float = 10.0) -> dict[str, str]:
    """Effective configuration of `topic` (every key, defaults included) as strings."""
    with _admin(bootstrap, timeout) as admin:
        result = admin.describe_configs(
            [ConfigResource(ConfigResourceType.TOPIC, topic)], config_filter="all"
        )
    entries = result.get("topic", {}).get(topic, {})
    return {name: str(entry.get("value")) for name, entry in entries.items()}


def ensure_loraloop_topics(
    settings: Settings, bootstrap: str | None = None, timeout: float = 30.0
) -> list[str]:
    """Create loraloop's topics (idempotent); returns the names newly created.

    Interactions, feedback and the dead-letter topic (events the learner could not read)
    use the delete policy; adapter-updates and bandit-state are compacted (key = user_id,
    latest wins). Tombstones on the compacted topics are kept 7 days (`delete.retention.ms`,
    Kafka's default is 1 day): a learner restarted after a long outage still sees deletions
    and drops the deleted users' late events. Every topic has
    `settings.kafka_replication_factor` replicas and `settings.kafka_min_insync_replicas`
    (KafkaReplicationError when the cluster cannot have them). `bootstrap` overrides
    `settings.kafka_bootstrap`.
    """
    compacted = {"cleanup.policy": "compact", "delete.retention.ms": str(TOMBSTONE_RETENTION_MS)}
    return create_topics(
        bootstrap or settings.kafka_bootstrap,
        {
            settings.topic_interactions: {"cleanup.policy": "delete"},
            settings.topic_feedback: {"cleanup.policy": "delete"},
            settings.topic_adapter_updates: compacted,
            settings.topic_bandit_state: compacted,
            settings.topic_dead_letter: {"cleanup.policy": "delete"},
        },
        partitions=settings.topic_partitions,
        timeout=timeout,
        replication_factor=settings.kafka_replication_factor,
        min_insync_replicas=settings.kafka_min_insync_replicas,
    )
