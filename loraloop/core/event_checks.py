"""What makes an event (or the feedback signals of a request) unusable, said in words.

Shared by serving, which refuses bad feedback signals with INVALID_ARGUMENT, and the
learner, which sends unusable events from its topics to the dead-letter topic instead of
learning from them: an out-of-vocabulary token id or a log-probability list of the wrong
length would fail the batched training step of every user in it, and a NaN rating would
poison an adapter silently. Each function returns None when the input is fine.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

from loraloop.core.gen.loraloop.v1 import common_pb2, events_pb2
from loraloop.core.user_ids import user_id_error

MAX_REQUEST_ID_CHARS = 256
SIGNAL_NAMES = (
    "thumbs, rating, accepted, copied, regenerated, edited, follow_up, dwell_ms"  # for messages
)


def signals_error(signals: common_pb2.FeedbackSignals) -> str | None:
    if not signals.ListFields():
        return f"signals is empty: send at least one of {SIGNAL_NAMES}"
    if signals.HasField("thumbs") and signals.thumbs not in (-1, 1):
        return f"signals.thumbs={signals.thumbs}: use +1 (up) or -1 (down)"
    if signals.HasField("rating") and not (
        math.isfinite(signals.rating) and 0 <= signals.rating <= 1
    ):
        return f"signals.rating={signals.rating}: use a value in [0, 1]"
    if signals.HasField("dwell_ms") and signals.dwell_ms < 0:
        return f"signals.dwell_ms={signals.dwell_ms}: must be >= 0"
    return None


def _ids_error(event: events_pb2.Interaction | events_pb2.FeedbackEvent) -> str | None:
    if not event.request_id:
        return "request_id is empty"
    if len(event.request_id) > MAX_REQUEST_ID_CHARS:
        return f"request_id is {len(event.request_id)} characters long"
    if event.timestamp_ms < 0:
        return f"timestamp_ms={event.timestamp_ms} is negative"
    return user_id_error(event.user_id)


def _all_finite(values: Iterable[float]) -> bool:
    return all(math.isfinite(v) for v in values)


def interaction_error(
    event: events_pb2.Interaction, vocab_size: int, max_positions: int | None = None
) -> str | None:
    """Why the learner cannot train on `event` with a model of `vocab_size` tokens and a
    context of `max_positions` (None: unbounded)."""
    error = _ids_error(event)
    if error:
        return error
    prompt, response = event.prompt_token_ids, event.response_token_ids
    if not prompt:
        return "prompt_token_ids is empty"
    for name, ids in (("prompt_token_ids", prompt), ("response_token_ids", response)):
        bad = next((t for t in ids if not 0 <= t < vocab_size), None)
        if bad is not None:
            return f"{name} holds {bad}, outside the model's vocabulary [0, {vocab_size})"
    if max_positions is not None and len(prompt) + len(response) > max_positions:
        return (
            f"{len(prompt)} prompt + {len(response)} response tokens exceed the model's "
            f"context of {max_positions}"
        )
    if len(event.behaviour_logprobs) != len(response):
        return (
            f"{len(event.behaviour_logprobs)} behaviour_logprobs for {len(response)} "
            "response tokens"
        )
    if not all(math.isfinite(lp) and lp <= 1e-3 for lp in event.behaviour_logprobs):
        return "behaviour_logprobs holds a value that is not a finite log-probability (<= 0)"
    sampling = event.sampling
    if not (math.isfinite(sampling.temperature) and sampling.temperature >= 0):
        return f"sampling.temperature={sampling.temperature} is not a finite value >= 0"
    if not (math.isfinite(event.arm_propensity) and 0 <= event.arm_propensity <= 1):
        return f"arm_propensity={event.arm_propensity} is not a probability"
    if not _all_finite(event.context):
        return "context holds a value that is not finite"
    return None


def feedback_error(event: events_pb2.FeedbackEvent) -> str | None:
    """Why the learner cannot take a reward from `event`."""
    return _ids_error(event) or signals_error(event.signals)
