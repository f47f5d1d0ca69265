"""The distribution the server samples from, in one place: temperature, then top-p.

The hf engine draws tokens from it and logs their log-probabilities as the behaviour
policy; the learner's importance ratios recompute the current policy the same way, so a
request or arm with top_p < 1 is corrected with the distribution actually sampled (a
ratio against the untruncated policy is biased whenever top_p < 1).
"""

from __future__ import annotations

import torch


def outside_nucleus(sorted_probs: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Mask of the tokens top-p drops, for probabilities sorted in descending order along
    the last dimension: the smallest prefix whose mass reaches top_p is kept (always at
    least one token). `top_p` has the leading shape of `sorted_probs`. top_p >= 1 drops
    nothing (a float32 cumulative sum can reach 1 before the last tokens: they stay)."""
    top_p = top_p[..., None]
    return ((sorted_probs.cumsum(-1) - sorted_probs) >= top_p) & (top_p < 1)


def sampling_log_softmax(scaled: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """`nucleus_log_softmax` for a batch of rows, with rows whose top_p >= 1 (nothing to
    truncate) done by a plain log_softmax: no sort of the vocabulary for them."""
    full = top_p >= 1
    if bool(full.all()):
        return scaled.log_softmax(-1)
    if not bool(full.any()):
        return nucleus_log_softmax(scaled, top_p)
    out = torch.empty_like(scaled)
    out[full] = scaled[full].log_softmax(-1)
    out[~full] = nucleus_log_softmax(scaled[~full], top_p[~full])
    return out


def nucleus_log_softmax(scaled: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Log-probabilities, over the vocabulary (last dimension, in its own order), of
    softmax(scaled) truncated by top-p and renormalised; -inf for the dropped tokens.
    `scaled` holds logits already divided by the temperature."""
    sorted_logits, order = scaled.sort(dim=-1, descending=True)
    dropped = outside_nucleus(sorted_logits.softmax(-1), top_p)
    logp_sorted = sorted_logits.masked_fill(dropped, float("-inf")).log_softmax(-1)
    return torch.empty_like(scaled).scatter_(-1, order, logp_sorted)
