"""Shared pytest fixtures."""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from loraloop.devtools.kafka_broker import KafkaBroker, KafkaCluster
    from loraloop.devtools.s3_server import SeaweedS3


def pytest_configure(config: pytest.Config) -> None:
    """The suite's base model is the demo's tiny Llama (built once into the cache): every
    `Settings()` made here, and every process started from here, gets it through the
    environment, as a deployment would. A LORALOOP_MODEL already set wins."""
    if not os.environ.get("LORALOOP_MODEL"):
        from loraloop.devtools.tiny_model import ensure_tiny_model

        os.environ["LORALOOP_MODEL"] = str(ensure_tiny_model(progress=False))


@pytest.fixture(scope="session")
def kafka_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[KafkaBroker]:
    """One real single-node Kafka broker (KRaft) for the whole session, on a free port.

    Its data and `server.log` live under pytest's basetemp (kept for post-mortems). Skips
    when Java or Maven is missing; any other start-up failure is an error.
    """
    from tests.support import own_broker

    with own_broker(tmp_path_factory.mktemp("kafka")) as broker:
        yield broker


@pytest.fixture(scope="session")
def kafka_bootstrap(kafka_broker: KafkaBroker) -> str:
    """Bootstrap string of the session broker, with loraloop's topics (from Settings()) created."""
    from loraloop.core.kafka.admin import ensure_loraloop_topics
    from loraloop.core.settings import Settings

    ensure_loraloop_topics(Settings(), bootstrap=kafka_broker.bootstrap)
    return kafka_broker.bootstrap


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SeaweedS3]:
    """One real S3-compatible server (SeaweedFS, `weed server -s3`) for the session, on
    free loopback ports, with the bucket "adapters". Its log lives under pytest's basetemp.
    The binary is built once into the cache (loraloop.devtools.s3_server)."""
    from loraloop.devtools.s3_server import SeaweedS3

    with SeaweedS3(tmp_path_factory.mktemp("s3"), buckets=("adapters",)) as server:
        yield server


@pytest.fixture
def s3_env(s3_server: SeaweedS3, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """The AWS variables that point boto3 (in this process) at the session's S3 server."""
    env = s3_server.env()
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    return env


@pytest.fixture(scope="session")
def kafka_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[KafkaCluster]:
    """A 3-broker KRaft cluster (the same jars, on loopback) for the tests of replicated
    topics, shared by the session (tests that kill a broker restart it). Skips when Java
    or Maven is missing."""
    import shutil

    from loraloop.devtools.kafka_broker import KafkaCluster

    missing = [tool for tool in ("java", "mvn") if shutil.which(tool) is None]
    if missing:
        pytest.skip(f"the Kafka cluster needs {' and '.join(missing)} on PATH")
    kafka = KafkaCluster(tmp_path_factory.mktemp("kafka-cluster"), nodes=3)
    kafka.start(timeout=180)
    try:
        yield kafka
    finally:
        kafka.stop()
