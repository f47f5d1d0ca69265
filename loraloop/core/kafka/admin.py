"""Kafka admin helpers that the server, the learner and the tools share: wait for a broker,
create loraloop's topics, read a topic's configuration. Works against any Kafka cluster."""

from __future__ import annotations

import contextlib
import logging
import socket
import time
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

from kafka import KafkaAdminClient
from kafka.admin import ConfigResource, ConfigResourceType
from kafka.errors import TopicAlreadyExistsError, for_code

from loraloop.core.settings import Settings

__all__ = [
    "TOMBSTONE_RETENTION_MS",
    "create_topics",
    "ensure_loraloop_topics",
    "ready_cluster_id",
    "topic_configs",
    "wait_for_kafka",
]

log = logging.getLogger(__name__)
TOMBSTONE_RETENTION_MS = 7 * 24 * 3600 * 1000


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


def create_topics(
    bootstrap: str,
    topics: Mapping[str, Mapping[str, Any]] | Sequence[str],
    partitions: int = 4,
    timeout: float = 30.0,
) -> list[str]:
    """Create topics that do not exist yet and wait until every one has leaders.

    `topics` is a list of names or a mapping of name -> topic-level Kafka configs (e.g.
    `{"adapter-updates": {"cleanup.policy": "compact"}}`); every topic gets `partitions`
    partitions and replication factor 1. Existing topics are left untouched. Returns the names
    actually created.
    """
    if isinstance(topics, str):
        topics = [topics]
    specs: dict[str, Mapping[str, Any]] = (
        dict(topics) if isinstance(topics, Mapping) else {name: {} for name in topics}
    )
    if not specs:
        return []
    request = {
        name: {
            "num_partitions": partitions,
            "replication_factor": 1,
            "configs": {k: _config_value(v) for k, v in cfg.items()},
        }
        for name, cfg in specs.items()
    }
    created: list[str] = []
    with _admin(bootstrap, timeout) as admin:
        result = admin.create_topics(request, timeout_ms=int(timeout * 1000), raise_errors=False)
        for topic in result["topics"]:
            error = for_code(topic["error_code"])
            if topic["error_code"] == 0:
                created.append(topic["name"])
            elif error is not TopicAlreadyExistsError:
                raise error(f"creating topic {topic['name']!r}: {topic.get('error_message')}")
        admin.wait_for_topics(list(specs), timeout_ms=int(timeout * 1000))
    return created


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
    and drops the deleted users' late events. `bootstrap` overrides `settings.kafka_bootstrap`.
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
    )
