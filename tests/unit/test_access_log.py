"""The access log (`loraloop.access`, one line per call at INFO) is written at the default
log level (WARNING), which the first version hid it under; `access_log_level` is its own."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator

import pytest

from loraloop.core.settings import Settings
from loraloop.core.structured_logs import ACCESS_LOGGER, configure_logging


@pytest.fixture
def restored_logging() -> Iterator[None]:
    """configure_logging() replaces the root handlers: put pytest's back afterwards."""
    root, access = logging.getLogger(), logging.getLogger(ACCESS_LOGGER)
    handlers, level, access_level = root.handlers[:], root.level, access.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)
    access.setLevel(access_level)


def _lines(err: str) -> list[dict[str, object]]:
    return [json.loads(line) for line in err.splitlines() if line.startswith("{")]


def test_access_lines_show_at_the_default_level(
    restored_logging: None, capsys: pytest.CaptureFixture[str]
) -> None:
    settings = Settings()
    assert settings.log_level == "WARNING" and settings.access_log_level == "INFO"
    configure_logging(settings.log_level, True, access_level=settings.access_log_level)
    logging.getLogger(ACCESS_LOGGER).info("grpc loraloop.v1.LoraLoop/Generate OK in 0.010s")
    logging.getLogger(ACCESS_LOGGER).debug("grpc grpc.health.v1.Health/Check OK in 0.001s")
    logging.getLogger("loraloop.service.server").info("an ordinary INFO line")
    logging.getLogger("loraloop.service.server").warning("a warning")
    lines = _lines(capsys.readouterr().err)
    assert [(line["logger"], line["level"]) for line in lines] == [
        (ACCESS_LOGGER, "INFO"),
        ("loraloop.service.server", "WARNING"),
    ]


def test_access_log_level_turns_them_off_or_adds_health_checks(
    restored_logging: None, capsys: pytest.CaptureFixture[str]
) -> None:
    configure_logging(
        "WARNING", True, access_level=Settings(access_log_level="warning").access_log_level
    )
    logging.getLogger(ACCESS_LOGGER).info("grpc loraloop.v1.LoraLoop/Generate OK in 0.010s")
    assert _lines(capsys.readouterr().err) == []
    configure_logging("WARNING", True, access_level="DEBUG")
    logging.getLogger(ACCESS_LOGGER).debug("grpc grpc.health.v1.Health/Check OK in 0.001s")
    assert [line["level"] for line in _lines(capsys.readouterr().err)] == ["DEBUG"]
