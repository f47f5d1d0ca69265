"""Shared pytest fixtures."""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from core.kafka.broker import KafkaBroker


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
    from core.kafka.broker import ensure_loraloop_topics
    from core.settings import Settings

    ensure_loraloop_topics(Settings(), bootstrap=kafka_broker.bootstrap)
    return kafka_broker.bootstrap
