"""Tolerances for two evaluations of the same math whose sums run in different orders.

Floating-point addition is not associative. A mixed batch and a row alone, a batched
backward and a per-user one, the bank's `bmm`s and peft's unfused LoRA layers, a KV-cache
decode and a full forward: each adds the same products in another order, and BLAS picks
that order by shape and by CPU (its blocking differs between AMD EPYC and Intel, with or
without AMX). Such results agree up to rounding, not bit for bit, and how closely depends
on the dtype, the size of the values and the number of terms and stages in the sums, not on
the CPU a test happened to be tuned on.

Model: a sum of n terms of size <= m, rounded at unit roundoff eps/2 per addition, is off by
about (eps/2) * m * sqrt(n) (rounding errors add like a random walk; n * eps/2 * m is the
worst case). Two orders then differ by up to eps * m * sqrt(n), and each of `depth`
sequential stages (the layers of a pre-norm transformer pass errors on with gain ~1) adds
as much again:

    atol = depth * eps(dtype) * m * sqrt(n)

Measured on the tiny Llama (hidden 128, MLP 352, 4 layers; bound for logits: n = 352,
depth 5, i.e. 94 eps * max|logit|): mixed batch vs rows alone, 12 eps32 * max|logit| in
float32 and at most 4.5 eps64 * max|logit| in float64 over 150 random cases; per-slot
gradients, batched vs per row (bound depth 10: 188 eps * max|grad|), at most 97 eps32 and
34 eps64 * max|grad|.

A claim that two paths compute *the same thing* is therefore checked in float64
(`float64_model`), where these bounds are ~1e-13 and a real routing or formula mistake
stands out by ten orders of magnitude; float32 comparisons that must stay use the bound
at eps32. One float32 rounding remains inside a float64 model: transformers' LlamaRMSNorm
normalises in float32 (`response_distributions` keeps float64 logits in float64). It
rounds inputs that agree to ~1e-15, so both paths get the same float32 values unless one
lies that close to a float32 rounding boundary (odds about 1e-8 per value; none in the 150
cases above). Scalars reduced over the vocabulary (losses, KL) keep a float32 bound, the
honest one should such a boundary be crossed.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import torch

from loraloop.core.model_loading import LoadedModel
from loraloop.core.multi_lora import LoRAWeights


def rounding_atol(dtype: torch.dtype, magnitude: float, terms: int, depth: int = 1) -> float:
    """How far two evaluations of the same sums, in different orders, may drift apart:
    `depth` stages of sums of `terms` terms, of size up to `magnitude`, in `dtype`."""
    return depth * torch.finfo(dtype).eps * magnitude * math.sqrt(terms)


def _terms(config: Any) -> int:
    # the longest dot product of one layer: q/k/v/o and the head sum over the hidden size,
    # the MLP's down projection over the intermediate size
    return max(config.hidden_size, config.intermediate_size)


def forward_atol(config: Any, dtype: torch.dtype, magnitude: float) -> float:
    """Outputs of a forward through every decoder layer and the head (logits) whose largest
    value is `magnitude`: one stage per layer, plus the head."""
    return rounding_atol(dtype, magnitude, _terms(config), config.num_hidden_layers + 1)


def backward_atol(config: Any, dtype: torch.dtype, magnitude: float) -> float:
    """Gradients of largest value `magnitude`: the forward's stages, then the same again
    on the way back."""
    return rounding_atol(dtype, magnitude, _terms(config), 2 * (config.num_hidden_layers + 1))


def adam_atol(grad_atol: float, learning_rate: float, adam_eps: float, steps: int) -> float:
    """Weights after `steps` clipped Adam steps whose gradients differ by up to `grad_atol`.

    The step is lr * m_hat / (sqrt(v_hat) + eps). m_hat is a weighted mean of the gradients
    and sqrt(v_hat) a weighted RMS (both weights summing to 1), so each moves by at most the
    gradient's change, and |m_hat| <= ~sqrt(v_hat); at its steepest (gradient ~0) the step
    then changes by at most lr * 2 * grad_atol / eps. Clipping multiplies the gradient by a
    factor <= 1 computed from the gradient itself: at most twice the change again. Steps add
    up (to first order: the next gradient is taken at weights that differ this little).
    """
    return steps * learning_rate * 4 * grad_atol / adam_eps


def float64_model(lm: LoadedModel) -> LoadedModel:
    """`lm` converted in place to float64: base weights and every slot of its LoRA bank
    (float32 values are exact in float64, so both paths start from the same numbers)."""
    lm.model.to(torch.float64)
    return lm


def as_dtype(weights: LoRAWeights, dtype: torch.dtype) -> LoRAWeights:
    """A copy of an adapter with A and B in `dtype` (e.g. before the bank folds a lower
    rank's scaling into B, so that rounding happens in float64 too)."""
    return dataclasses.replace(
        weights,
        a={n: t.to(dtype) for n, t in weights.a.items()},
        b={n: t.to(dtype) for n, t in weights.b.items()},
    )
