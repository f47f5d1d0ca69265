"""What the event log counts (events accepted, sent, delivered, spilled, drained, and every
drop by reason) and its throttled warnings: nothing is dropped silently, and no warning
floods the log."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Literal, get_args

from loraloop.service.log_throttle import LogThrottle

__all__ = ["DROP_REASONS", "DropReason", "EventStats", "Warn", "WarnTopic", "log"]

# Every part of the event log logs as the event log (its name is what operators filter on).
log = logging.getLogger("loraloop.service.event_log")

DropReason = Literal[
    "queue_full",
    "spill_full",
    "spill_error",
    "rejected",
    "no_topic",
    "sender_error",
    "journal_torn",
]
DROP_REASONS: tuple[DropReason, ...] = get_args(DropReason)
WarnTopic = DropReason | Literal["spill", "kafka", "sender"]


class Warn:
    """A warning logged at most once per `period` seconds, with the count in between."""

    def __init__(self, period: float = 10.0) -> None:
        self._throttle = LogThrottle(period)

    def __call__(self, msg: str, *args: object, exc_info: BaseException | None = None) -> None:
        held = self._throttle.admit()
        if held is None:
            return
        if held:
            msg, args = msg + " (%d times since the last such warning)", (*args, held + 1)
        log.warning(msg, *args, exc_info=exc_info)


_WARN_TOPICS: tuple[WarnTopic, ...] = ("spill", "kafka", "sender", *DROP_REASONS)


def _warnings() -> dict[WarnTopic, Warn]:
    return {topic: Warn() for topic in _WARN_TOPICS}


@dataclass
class EventStats:
    """The event log's counters (written by publish() and the sender, read from any thread)."""

    accepted: int = 0  # queued by publish()
    sent: int = 0  # handed to the producer (from the queue or the journal; retries too)
    delivered: int = 0  # acknowledged by Kafka
    spilled: int = 0  # appended to the journal
    drained: int = 0  # acknowledged by Kafka after a stay in the journal
    sender_errors: int = 0  # unexpected errors the sender thread survived
    routed: int = 0  # taken off the queue and placed (sent, spilled or dropped)
    left_at_stop: int | None = None  # events left in the journal by stop()
    dropped: dict[DropReason, int] = field(default_factory=lambda: dict.fromkeys(DROP_REASONS, 0))
    warn: dict[WarnTopic, Warn] = field(default_factory=_warnings)

    def drop(self, reason: DropReason, msg: str, *args: object, counted: bool = True) -> None:
        """Count an event lost for `reason` (unless not `counted`) and warn, throttled."""
        if counted:
            self.dropped[reason] += 1
        self.warn[reason](msg, *args)
