"""Online DPO on preference pairs, many users in one pass, the base model as reference.

For user u with pairs i (prompt x_i, chosen y+_i, rejected y-_i, learner/preferences.py):

    s(y | x) = sum_t log pi(y_t | x, y_<t)      the user's adapter on (the policy)
    r(y | x) = sum_t log pi_0(y_t | x, y_<t)    the adapter off: the base model (reference)
    m_i      = beta * ((s(y+_i) - r(y+_i)) - (s(y-_i) - r(y-_i)))
    loss_u   = (1/n_u) sum_i -log sigmoid(m_i)

The reference is the same model with every row on the bank's slot 0 (the all-zero adapter),
so it costs no second model: one forward without gradient over every pair's two rows, and
one forward with each row on its user's slot, for all users of the step at once. A new
user's adapter (B = 0) is the base model, so its first margins are 0 and its loss log 2.

How it combines with the reward path (the setting preference_learning): 'preference' steps
on loss_u alone, 'both' on REINFORCE's loss plus dpo_weight * loss_u, in one backward pass
and one Adam step per user (`preference_step` hands the loss to
learner/algos/reinforce.py's step, which clips and steps each user as it does its own
loss). A user with pairs and no rewarded sample is stepped on the pairs alone; its update
reports the mean per-token KL to the base model over its pairs' responses (what the
rollback guard reads), since it has no REINFORCE KL.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from loraloop.core.logprobs import response_distributions, token_logprobs
from loraloop.core.model_loading import LoadedModel
from loraloop.core.settings import Settings, default_of
from loraloop.learner.algos.reinforce import ReinforceConfig, UserBatch, UserUpdate, reinforce_step


@dataclass(frozen=True)
class DPOConfig:
    """The DPO loss's settings."""

    beta: float = default_of("dpo_beta")
    # the DPO loss's weight beside REINFORCE's ('both'); 1 when it is the only loss
    weight: float = default_of("dpo_weight")

    @classmethod
    def from_settings(cls, settings: Settings) -> DPOConfig:
        weight = settings.dpo_weight if settings.preference_learning == "both" else 1.0
        return cls(beta=settings.dpo_beta, weight=weight)


@dataclass
class PairBatch:
    """One user's preference pairs in a step."""

    prompts: list[list[int]] = field(default_factory=list)
    chosen: list[list[int]] = field(default_factory=list)
    rejected: list[list[int]] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.prompts)


@dataclass
class PairLosses:
    """What the DPO part of a step computed, per user (zeros for users without pairs)."""

    losses: list[torch.Tensor]  # loss_u, under autograd
    pairs: list[int]
    mean_loss: list[float]
    accuracy: list[float]  # share of pairs with a positive margin, before the step
    kl: list[float]  # mean per-token KL to the base model over the pairs' responses


@dataclass
class PreferenceUpdate(UserUpdate):
    """A user's update with what its pairs contributed."""

    pairs: int = 0
    preference_loss: float = 0.0
    preference_accuracy: float = 0.0


def dpo_loss(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    ref_chosen: torch.Tensor,
    ref_rejected: torch.Tensor,
    beta: float,
) -> torch.Tensor:
    """-log sigmoid(beta * ((s+ - r+) - (s- - r-))) per pair, from sequence log-probs."""
    margin = beta * ((policy_chosen - ref_chosen) - (policy_rejected - ref_rejected))
    return -F.logsigmoid(margin)


def pair_losses(
    lm: LoadedModel, users: list[PairBatch], slots: list[int], cfg: DPOConfig
) -> PairLosses:
    """Each user's DPO loss, every pair of every user in one reference forward (no
    gradient) and one policy forward (row i on its user's slot)."""
    if len(users) != len(slots):
        raise ValueError("users and slots must have the same length")
    prompts: list[list[int]] = []
    responses: list[list[int]] = []
    rows: list[int] = []
    owners: list[int] = []
    for k, user in enumerate(users):
        for prompt, chosen, rejected in zip(user.prompts, user.chosen, user.rejected, strict=True):
            prompts += [prompt, prompt]
            responses += [chosen, rejected]
            rows += [slots[k], slots[k]]
            owners.append(k)
    device = lm.bank.device
    n_users = len(users)
    zero = torch.zeros((), device=device)
    out = PairLosses(
        [zero] * n_users, [len(u) for u in users], [0.0] * n_users, [0.0] * n_users, [0.0] * n_users
    )
    if not prompts:
        return out
    pad = lm.tokenizer.pad_token_id or 0
    bank = lm.bank
    with torch.no_grad():
        ref_dists = response_distributions(lm.model, bank, prompts, responses, [0] * len(rows), pad)
    ref = torch.stack([lp.sum() for lp in token_logprobs(ref_dists, responses)])
    dists = response_distributions(lm.model, bank, prompts, responses, rows, pad)
    policy = torch.stack([lp.sum() for lp in token_logprobs(dists, responses)])
    losses = dpo_loss(policy[0::2], policy[1::2], ref[0::2], ref[1::2], cfg.beta)
    with torch.no_grad():
        margins = (policy[0::2] - ref[0::2]) - (policy[1::2] - ref[1::2])
        kls = [(d.exp() * (d - r)).sum(-1) for d, r in zip(dists, ref_dists, strict=True)]
    owner = torch.tensor(owners, device=device)
    for k in range(n_users):
        n = out.pairs[k]
        if not n:
            continue
        mine = owner == k
        out.losses[k] = losses[mine].sum() / n
        out.mean_loss[k] = float(out.losses[k].detach())
        out.accuracy[k] = float((margins[mine] > 0).float().mean())
        rows_of_k = [row for i, o in enumerate(owners) if o == k for row in (2 * i, 2 * i + 1)]
        out.kl[k] = float(torch.cat([kls[row] for row in rows_of_k]).mean())
    return out


def preference_step(
    lm: LoadedModel,
    users: list[UserBatch],
    pairs: list[PairBatch],
    reinforce: ReinforceConfig,
    cfg: DPOConfig,
) -> list[PreferenceUpdate]:
    """One batched step on each user's REINFORCE samples (`users`, possibly without any)
    plus `cfg.weight` times the DPO loss of their pairs (`pairs[k]` is `users[k]`'s)."""
    if len(users) != len(pairs):
        raise ValueError("users and pairs must have the same length")
    found: list[PairLosses] = []

    def extra(slots: list[int]) -> list[torch.Tensor]:
        found.append(pair_losses(lm, pairs, slots, cfg))
        return [cfg.weight * loss for loss in found[0].losses]

    updates = reinforce_step(lm, users, reinforce, extra=extra)
    (dpo,) = found
    out = []
    for k, (user, upd) in enumerate(zip(users, updates, strict=True)):
        fields = {f.name: getattr(upd, f.name) for f in dataclasses.fields(UserUpdate)}
        if not user.rewards:
            fields["kl"] = dpo.kl[k]
        out.append(
            PreferenceUpdate(
                **fields,
                pairs=dpo.pairs[k],
                preference_loss=dpo.mean_loss[k],
                preference_accuracy=dpo.accuracy[k],
            )
        )
    return out
