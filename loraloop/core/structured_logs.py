"""Logging set-up for the commands: plain text, or one JSON object per line.

JSON lines carry the request_id and user_id of the request being handled, when there is
one, so a log store can join a server's lines with the learner's for the same request:
`log_context(...)` binds them for the current thread or asyncio task (a contextvar, so
concurrent gRPC calls do not see each other's), and `extra={"user_id": ...}` on a single
call works too.
"""

from __future__ import annotations

import contextlib
import contextvars
import json
import logging
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

CORRELATION_FIELDS = ("request_id", "user_id")
_context: contextvars.ContextVar[dict[str, str] | None] = contextvars.ContextVar(
    "loraloop_log_context", default=None
)
# Attributes every LogRecord has; anything else on a record came from `extra=`.
_STANDARD = set(logging.makeLogRecord({}).__dict__) | {"message", "asctime", "taskName"}


def bind_log_context(**fields: str) -> None:
    """Add fields (e.g. request_id) to the current context's log lines from now on."""
    current = dict(_context.get() or {})
    current.update({k: v for k, v in fields.items() if v})
    _context.set(current)


@contextlib.contextmanager
def log_context(**fields: str) -> Iterator[None]:
    """Bind fields to every log line written inside the block (this thread/task only)."""
    token = _context.set({**(_context.get() or {}), **{k: v for k, v in fields.items() if v}})
    try:
        yield
    finally:
        try:
            _context.reset(token)
        except ValueError:
            # A streaming handler can finish in another context than it started in (gRPC
            # runs async generators across tasks): restore the previous value directly.
            old = token.old_value
            _context.set(None if old is contextvars.Token.MISSING else old)


class JsonFormatter(logging.Formatter):
    """`{"ts", "level", "logger", "message", <context>, <extra>...}`, one object per line."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        entry.update(_context.get() or {})
        for key, value in record.__dict__.items():
            if key not in _STANDARD and not key.startswith("_"):
                entry[key] = value if isinstance(value, str | int | float | bool) else str(value)
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False)


ACCESS_LOGGER = "loraloop.access"  # one line per call at INFO (service/metrics.py)


def configure_logging(level: str, json_lines: bool, access_level: str = "INFO") -> None:
    """Root logging for a loraloop command at `level`; the access log at `access_level`
    of its own (INFO: shown whatever `level` is, e.g. beside the default WARNING); Kafka's
    client library only reports errors."""
    handler = logging.StreamHandler()
    if json_lines:
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=level.upper(), handlers=[handler], force=True)
    logging.getLogger("kafka").setLevel(logging.ERROR)
    logging.getLogger(ACCESS_LOGGER).setLevel(access_level.upper())
