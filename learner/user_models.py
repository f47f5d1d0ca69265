"""Each user's adapter as the learner knows it: weights, optimiser state, learner state.

Loaded from the newest version in the adapter store (the store is the truth; what is held
here is a cache), or initialised like peft does for a new user: A uniform in
±1/sqrt(in_features), B zero, so a new adapter starts exactly at the base model.
"""

from __future__ import annotations

import hashlib
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

import torch

from core.adapter_store import AdapterStore, StoredVersion
from core.bandits.features import DIM
from core.bandits.linear import BanditState
from core.multi_lora import LoRABank, LoRAWeights
from core.peft_format import read_peft_dir, to_peft_files
from learner.algos.reinforce import AdamState
from learner.guard import GuardState

MAX_APPLIED_IDS = 4096


@dataclass
class UserModel:
    user_id: str
    version: int  # 0: no version stored yet
    weights: LoRAWeights
    bandit: BanditState
    adam: AdamState = field(default_factory=AdamState)
    baseline: float = 0.0
    updates: int = 0
    rollbacks: int = 0
    applied: list[str] = field(default_factory=list)  # request_ids already learnt from
    guard: GuardState = field(default_factory=GuardState)

    def state(self) -> dict[str, Any]:
        """What is stored with each version, so a version restores the whole user."""
        return {
            "baseline": self.baseline,
            "updates": self.updates,
            "rollbacks": self.rollbacks,
            "applied_request_ids": self.applied[-MAX_APPLIED_IDS:],
            "bandit": self.bandit.to_json(),
            "guard": self.guard.to_json(),
            "written_at_ms": int(time.time() * 1000),
        }


def initial_weights(bank: LoRABank, user_id: str, seed: int) -> LoRAWeights:
    digest = hashlib.sha256(f"{seed}:{user_id}".encode()).digest()
    gen = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little"))
    weights = LoRAWeights(bank.rank, bank.alpha)
    for name, layer in bank.layers.items():
        fan_in = layer.base.in_features
        bound = 1.0 / fan_in**0.5
        weights.a[name] = (torch.rand(bank.rank, fan_in, generator=gen) * 2 - 1) * bound
        weights.b[name] = torch.zeros(layer.base.out_features, bank.rank)
    return weights


class UserModels:
    """An LRU of user models backed by the adapter store."""

    def __init__(
        self,
        store: AdapterStore,
        bank: LoRABank,
        seed: int,
        arms: list[str],
        capacity: int = 1024,
    ):
        self.arms = arms
        self.store = store
        self.bank = bank
        self.seed = seed
        self.capacity = capacity
        self._cache: OrderedDict[str, UserModel] = OrderedDict()

    def get(self, user_id: str) -> UserModel:
        latest = self.store.latest(user_id)
        cached = self._cache.get(user_id)
        if cached is not None and cached.version == (latest.version if latest else 0):
            self._cache.move_to_end(user_id)
            return cached
        model = self._load(user_id, latest)
        self._cache[user_id] = model
        while len(self._cache) > self.capacity:
            self._cache.popitem(last=False)
        return model

    def _load(self, user_id: str, latest: StoredVersion | None) -> UserModel:
        if latest is None:
            return UserModel(
                user_id,
                0,
                initial_weights(self.bank, user_id, self.seed),
                BanditState(self.arms, DIM),
            )
        state = self.store.learner_state(user_id, latest.version)
        return UserModel(
            user_id,
            latest.version,
            read_peft_dir(latest.path),
            BanditState.from_json(state.get("bandit"), self.arms, DIM),
            baseline=float(state.get("baseline", 0.0)),
            updates=int(state.get("updates", 0)),
            rollbacks=int(state.get("rollbacks", 0)),
            applied=list(state.get("applied_request_ids", [])),
            guard=GuardState.from_json(state.get("guard")),
        )

    def weights_of(self, user_id: str, version: int) -> LoRAWeights:
        """A stored version's weights (version 0: the user's initial adapter, the base)."""
        if version == 0:
            return initial_weights(self.bank, user_id, self.seed)
        return read_peft_dir(self.store.get(user_id, version).path)

    def commit(self, model: UserModel, base_model: str, targets: list[str]) -> StoredVersion:
        """Write the model as its next version (atomic) and cache it under that version."""
        version = model.version + 1
        stored = self.store.write(
            model.user_id, version, to_peft_files(model.weights, base_model, targets), model.state()
        )
        model.version = version
        self._cache[model.user_id] = model
        return stored

    def forget(self, user_id: str) -> None:
        self._cache.pop(user_id, None)
