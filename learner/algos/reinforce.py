"""REINFORCE with a baseline, truncated importance sampling and an exact KL penalty to
the base model, many users in one backward pass.

For user u with samples i (prompt x_i, response y_i, reward r_i, behaviour log-probs mu):

    b_i   = mean of the user's other rewards in this batch (leave-one-out, RLOO) when the
            user has several samples, else the user's running-mean baseline b_u
    A_i   = r_i - b_i
    rho_t = min(c, pi_T(y_t | .) / mu(y_t | .))      (no gradient; pi_T at the sampling
            temperature T, the distribution mu was drawn from; rho = 1 for greedy samples)
    KL_i  = mean_t  sum_v pi(v | .) (log pi(v | .) - log pi_0(v | .))   (full vocabulary)
    loss  = sum_u (1/n_u) sum_i [ -A_i * mean_t rho_t log pi(y_t | .)  +  beta * KL_i ]

The importance ratio corrects for samples drawn by an older adapter version (the learner
is always a little behind the server); truncating it at c bounds the variance, as in
PipelineRL and V-trace.

The KL term is what keeps a tiny model fluent. In early measurements on the tiny model
(3 users x 2 seeds), without it a learning rate of 3e-3 or more first gamed the scorer,
then turned to word salad and collapsed (reward 0, no gradient, no recovery) in every run
by 300 interactions; a k1 KL estimate in the reward and positive-only advantages did not
prevent it. The exact per-position KL over the full vocabulary (beta 0.05) did: reward
0.86 at 100 interactions.

Users' adapters are disjoint parameters, so the summed loss gives each user the gradient of
their own loss: in exact arithmetic the same as a step for that user alone; numerically equal
in float64 up to rounding, and in float32 within rounding scaled by the gradient's size (tens
of ulps of the largest gradient), as the batch sums in another order than a user alone, and
BLAS's order differs between CPUs. Each user's gradient is
clipped to `max_grad_norm`, then an Adam step (state kept per user) moves that user's
adapter. After the step the baseline moves toward the new rewards:
b_u <- d * b_u + (1 - d) * mean_i r_i.

Devices and precision: the forward and backward run where the model is (`Settings.device`),
in its dtype; the Adam step runs there too, in float32 at least, on the user's own weights
(the master copy) rather than on the bank's copy of them, so a bfloat16 bank does not round
away the small steps. What the learner holds between steps (each user's weights and Adam
moments, an LRU of many users) stays in host RAM: the step copies it in and its results out.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from loraloop.core.logprobs import response_distributions, token_logprobs
from loraloop.core.model_loading import LoadedModel
from loraloop.core.multi_lora import LoRABank, LoRAWeights
from loraloop.core.sampling import nucleus_log_softmax
from loraloop.core.settings import Settings, default_of

HOST = torch.device("cpu")  # where users' weights and Adam moments are kept between steps
# More of each user's loss, from the same step (the DPO loss of learner/algos/dpo.py):
# called under autograd once every user is loaded, with each user's bank slot; returns one
# scalar per user, added to that user's loss before the one backward pass.
ExtraLoss = Callable[[list[int]], list[torch.Tensor]]


@dataclass
class ReinforceConfig:
    """The update's hyper-parameters. Those that are settings take their defaults from
    `Settings` (one place); the Adam constants are not settings."""

    learning_rate: float = default_of("learning_rate")
    max_grad_norm: float = default_of("max_grad_norm")
    baseline_decay: float = default_of("baseline_decay")
    kl_coef: float = default_of("kl_coef")
    is_truncation: float = default_of("is_truncation")
    loo_baseline: bool = default_of("loo_baseline")
    adam_betas: tuple[float, float] = (0.9, 0.999)
    adam_eps: float = 1e-8
    # A user whose gradient norm is below this is left as is: Adam rescales any gradient to
    # a step of about learning_rate, so it would turn pure rounding noise into real moves.
    min_grad_norm: float = 1e-5

    @classmethod
    def from_settings(cls, settings: Settings) -> ReinforceConfig:
        return cls(
            learning_rate=settings.learning_rate,
            max_grad_norm=settings.max_grad_norm,
            baseline_decay=settings.baseline_decay,
            kl_coef=settings.kl_coef,
            is_truncation=settings.is_truncation,
            loo_baseline=settings.loo_baseline,
        )


@dataclass
class AdamState:
    step: int = 0
    m: dict[str, torch.Tensor] = field(default_factory=dict)
    v: dict[str, torch.Tensor] = field(default_factory=dict)


@dataclass
class UserBatch:
    """One user's part of a step: current adapter, optimiser state and samples."""

    weights: LoRAWeights
    adam: AdamState
    baseline: float
    prompts: list[list[int]]
    responses: list[list[int]]
    rewards: list[float]
    # Logged log-probs of each response token under the policy that sampled it, and the
    # temperature and top_p it was sampled at; None: treat the samples as on-policy.
    behaviour: list[list[float]] | None = None
    temperatures: list[float] | None = None
    top_ps: list[float] | None = None


@dataclass
class UserUpdate:
    weights: LoRAWeights
    baseline: float
    loss: float
    grad_norm: float
    mean_reward: float
    mean_advantage: float
    kl: float


def _adam(
    param: torch.Tensor, grad: torch.Tensor, state: AdamState, key: str, cfg: ReinforceConfig
) -> torch.Tensor:
    b1, b2 = cfg.adam_betas
    m = _moment(state.m, key, param).mul_(b1).add_(grad, alpha=1 - b1)
    v = _moment(state.v, key, param).mul_(b2).addcmul_(grad, grad, value=1 - b2)
    state.m[key], state.v[key] = m.to(HOST), v.to(HOST)
    m_hat = m / (1 - b1**state.step)
    v_hat = v / (1 - b2**state.step)
    return param - cfg.learning_rate * m_hat / (v_hat.sqrt() + cfg.adam_eps)


def _moment(moments: dict[str, torch.Tensor], key: str, like: torch.Tensor) -> torch.Tensor:
    """A kept Adam moment on `like`'s device and dtype (zeros the first time)."""
    held = moments.get(key)
    return torch.zeros_like(like) if held is None else held.to(like.device, like.dtype)


def _master(user: UserBatch, bank: LoRABank, slot: int) -> LoRAWeights:
    """The weights the optimiser steps, on the bank's device in float32 at least: the user's
    own (exact) when they are at the bank's rank and alpha, else the slot they were loaded
    into (zero-padded, scaling folded into B)."""
    dtype = torch.promote_types(bank.dtype, torch.float32)
    w = user.weights
    same = w.rank == bank.rank and w.alpha == bank.alpha and w.a.keys() == bank.layers.keys()
    src = w if same and w.b.keys() == bank.layers.keys() else bank.read(slot)
    out = LoRAWeights(bank.rank, bank.alpha)
    for name in bank.layers:
        out.a[name] = src.a[name].to(bank.device, dtype)
        out.b[name] = src.b[name].to(bank.device, dtype)
    return out


def _to_host(weights: LoRAWeights) -> LoRAWeights:
    out = LoRAWeights(weights.rank, weights.alpha)
    out.a = {name: t.to(HOST) for name, t in weights.a.items()}
    out.b = {name: t.to(HOST) for name, t in weights.b.items()}
    return out


def _baseline(user: UserBatch, i: int, cfg: ReinforceConfig) -> float:
    n = len(user.rewards)
    if cfg.loo_baseline and n > 1:
        return (sum(user.rewards) - user.rewards[i]) / (n - 1)
    return user.baseline


def _truncated_ratio(
    dist: torch.Tensor,
    response: list[int],
    behaviour: list[float] | None,
    temperature: float,
    top_p: float,
    cfg: ReinforceConfig,
) -> torch.Tensor:
    """Per-token min(c, pi_{T,p} / mu), detached, where pi_{T,p} is the current policy as the
    server samples it (temperature T, then top-p; loraloop.core.sampling); ones when there
    is nothing to correct. A token outside the current policy's nucleus has ratio 0."""
    if behaviour is None or temperature <= 0 or len(behaviour) != len(response):
        return torch.ones(len(response), device=dist.device)
    with torch.no_grad():
        # dist holds log-probs: dividing by T equals logits / T up to a per-row constant
        p = torch.full(dist.shape[:-1], top_p if 0 < top_p < 1 else 1.0, device=dist.device)
        scaled = nucleus_log_softmax(dist / temperature, p.to(dist.dtype))
        tokens = torch.tensor(response, device=dist.device)
        pi_t = scaled.gather(-1, tokens[:, None]).squeeze(-1)
        mu = torch.tensor(behaviour, device=dist.device)
        return (pi_t - mu).exp().clamp(max=cfg.is_truncation)


def _grad(param: torch.Tensor) -> torch.Tensor:
    """The gradient the backward pass left on a bank parameter (zeros if it reached none)."""
    return param.grad if param.grad is not None else torch.zeros_like(param)


def reinforce_step(
    lm: LoadedModel, users: list[UserBatch], cfg: ReinforceConfig, extra: ExtraLoss | None = None
) -> list[UserUpdate]:
    """One batched policy-gradient step for `users` (at most bank.slots - 1 of them), on the
    model's device; the updates' weights are on the host. `extra` adds more of each user's
    loss; a user with no samples is then stepped on that alone."""
    bank = lm.bank
    device = bank.device
    if len(users) >= bank.slots:
        raise ValueError(f"{len(users)} users exceed the learner's {bank.slots - 1} slots")
    prompts, responses, slots, advantages, owners = [], [], [], [], []
    behaviour: list[list[float] | None] = []
    temperatures: list[float] = []
    top_ps: list[float] = []
    for k, user in enumerate(users):
        bank.load(k + 1, user.weights)
        for i, (p, r) in enumerate(zip(user.prompts, user.responses, strict=True)):
            prompts.append(p)
            responses.append(r)
            slots.append(k + 1)
            advantages.append(user.rewards[i] - _baseline(user, i, cfg))
            owners.append(k)
            behaviour.append(user.behaviour[i] if user.behaviour else None)
            temperatures.append(user.temperatures[i] if user.temperatures else 1.0)
            top_ps.append(user.top_ps[i] if user.top_ps else 1.0)
    params = bank.parameters()
    for param in params:
        param.requires_grad_(True)
        param.grad = None
    pad = lm.tokenizer.pad_token_id or 0
    base: list[torch.Tensor] = []
    if cfg.kl_coef and prompts:
        with torch.no_grad():
            base = response_distributions(lm.model, bank, prompts, responses, [0] * len(slots), pad)
    kls = [0.0] * len(users)
    try:
        with torch.enable_grad():
            dists = (
                response_distributions(lm.model, bank, prompts, responses, slots, pad)
                if prompts
                else []
            )
            token_logps = token_logprobs(dists, responses)
            per_user_loss = [torch.zeros((), device=device) for _ in users]
            for i, (logp, adv, k) in enumerate(zip(token_logps, advantages, owners, strict=True)):
                n = len(users[k].rewards)
                rho = _truncated_ratio(
                    dists[i], responses[i], behaviour[i], temperatures[i], top_ps[i], cfg
                )
                per_user_loss[k] = per_user_loss[k] - adv * (rho * logp).mean() / n
                if cfg.kl_coef:
                    kl = (dists[i].exp() * (dists[i] - base[i])).sum(-1).mean()
                    per_user_loss[k] = per_user_loss[k] + cfg.kl_coef * kl / n
                    kls[k] += float(kl.detach()) / n
            if extra is not None:
                more = extra([k + 1 for k in range(len(users))])
                per_user_loss = [a + b for a, b in zip(per_user_loss, more, strict=True)]
            torch.stack(per_user_loss).sum().backward()
    finally:
        for param in params:
            param.requires_grad_(False)

    updates = []
    with torch.no_grad():
        for k, user in enumerate(users):
            slot = k + 1
            current = _master(user, bank, slot)
            dtype = next(iter(current.a.values())).dtype
            grads = {
                name: (_grad(layer.lora_A)[slot].to(dtype), _grad(layer.lora_B)[slot].to(dtype))
                for name, layer in bank.layers.items()
            }
            norm = torch.sqrt(
                sum(
                    (ga.square().sum() + gb.square().sum() for ga, gb in grads.values()),
                    torch.zeros((), device=device, dtype=dtype),
                )
            )
            clip = min(1.0, cfg.max_grad_norm / (float(norm) + 1e-12))
            new = current
            if float(norm) >= cfg.min_grad_norm:
                user.adam.step += 1
                new = LoRAWeights(bank.rank, bank.alpha)
                for name, (ga, gb) in grads.items():
                    new.a[name] = _adam(current.a[name], ga * clip, user.adam, f"{name}.A", cfg)
                    new.b[name] = _adam(current.b[name], gb * clip, user.adam, f"{name}.B", cfg)
            n = len(user.rewards)
            mean_reward = sum(user.rewards) / n if n else 0.0
            baseline = user.baseline
            if n:
                baseline = cfg.baseline_decay * baseline + (1 - cfg.baseline_decay) * mean_reward
            advantage = sum(a for a, o in zip(advantages, owners, strict=True) if o == k)
            updates.append(
                UserUpdate(
                    weights=_to_host(new),
                    baseline=baseline,
                    loss=float(per_user_loss[k]),
                    grad_norm=float(norm),
                    mean_reward=mean_reward,
                    mean_advantage=advantage / n if n else 0.0,
                    kl=kls[k],
                )
            )
    for param in params:
        param.grad = None
    return updates
