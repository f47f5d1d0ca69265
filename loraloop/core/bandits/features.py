"""Context features of a request, computed by the server and logged on the interaction,
so the learner updates the bandit with exactly what the choice saw."""

from __future__ import annotations

import numpy as np

DIM = 3


def context_features(prompt_tokens: int, is_chat: bool) -> np.ndarray:
    """[bias, prompt length (0..1, saturating at 256 tokens), chat request]."""
    return np.array([1.0, min(prompt_tokens, 256) / 256.0, 1.0 if is_chat else 0.0])
