"""The server's built-in context features of a request, computed by the server and logged
on the interaction, so the learner updates the bandit with exactly what the choice saw.
A context schema (context_schema.py) puts them after the bias, or leaves them out, and
adds the client's features; DIM is the built-in schema's length (no schema file)."""

from __future__ import annotations

import numpy as np

DIM = 3


def context_features(prompt_tokens: int, conversation: bool) -> np.ndarray:
    """[bias, prompt length (0..1, saturating at 256 tokens), conversation]: a conversation
    is more than one message (earlier turns, or the client's own system message); a plain
    prompt and the same text as one user message are the same request, with the same
    context."""
    return np.array([1.0, min(prompt_tokens, 256) / 256.0, 1.0 if conversation else 0.0])
