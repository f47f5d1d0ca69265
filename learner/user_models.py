"""Each user's adapter as the learner knows it: weights, optimiser state, learner state.

Loaded from the newest version in the adapter store (the store is the truth; what is held
here is a cache), or initialised like peft does for a new user: A uniform in
±1/sqrt(in_features), B zero, so a new adapter starts exactly at the base model.

A version whose files no longer read (weights or learner state: truncated, corrupt,
failing their checksum) never stops the learner: it learns on from the newest older
version whose weights and state both read (never one's weights with another's state), or
from the initial adapter, logs that and counts it; the next version is still numbered
after the newest one, since versions are immutable.

Weights are held in host RAM (CPU tensors, as the store reads them and the step returns
them) whatever `Settings.device` is, so many cached users cost no GPU memory: loading into
the bank copies them to the model's device, and versions are written from the host.

Bandit statistics belong to one context schema (loraloop/core/bandits/context_schema.py).
A user's stored statistics over another schema than the learner's are not used and not
dropped: they are kept in the learner state under `bandit_other_schemas`, keyed by their
schema's fingerprint, and become the user's statistics again when that schema comes
back (logged once per process, counted by `on_schema_mismatch`).
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from loraloop.core.adapters.peft_format import read_peft_dir, to_peft_files
from loraloop.core.adapters.protocol import VersionStore
from loraloop.core.adapters.store import AdapterStoreError
from loraloop.core.adapters.version import AdapterVersion
from loraloop.core.bandits.context_schema import BUILTIN, ContextSchema
from loraloop.core.bandits.linear import BanditState
from loraloop.core.multi_lora import LoRABank, LoRAWeights
from loraloop.learner.algos.reinforce import AdamState
from loraloop.learner.applied import AppliedOffsets, Position
from loraloop.learner.guard import GuardState

log = logging.getLogger(__name__)
MAX_APPLIED_IDS = 4096


def position_text(pos: Position) -> str:
    return f"{pos[0]}:{pos[1]}:{pos[2]}"


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
    offsets: AppliedOffsets = field(default_factory=AppliedOffsets)  # interactions learnt from
    learnt_from: list[tuple[str, str]] = field(default_factory=list)  # this version's samples
    loaded_from: int = 0  # the version whose weights and state were read (0: initial)
    # statistics over other context schemas (to_json dicts by fingerprint): kept, not used
    other_bandits: dict[str, dict[str, Any]] = field(default_factory=dict)

    def state(self) -> dict[str, Any]:
        """What is stored with each version, so a version restores the whole user.

        Replays are recognised by Kafka position (`applied_offsets`, exact and unbounded)
        and, for an event produced twice at different offsets, by request_id (the most
        recent MAX_APPLIED_IDS). `learnt_from` lists this version's own samples as
        (request_id, "topic:partition:offset"): an audit of what each version applied."""
        other = {"bandit_other_schemas": self.other_bandits} if self.other_bandits else {}
        return other | {
            "baseline": self.baseline,
            "updates": self.updates,
            "rollbacks": self.rollbacks,
            "applied_request_ids": self.applied[-MAX_APPLIED_IDS:],
            "applied_offsets": self.offsets.to_json(),
            "learnt_from": [list(item) for item in self.learnt_from],
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
        store: VersionStore,
        bank: LoRABank,
        seed: int,
        arms: list[str],
        capacity: int = 1024,
        on_unreadable: Callable[[str, int], None] | None = None,
        schema: ContextSchema = BUILTIN,
        on_schema_mismatch: Callable[[str, str], None] | None = None,
    ):
        self.arms = arms
        self.schema = schema
        self.on_schema_mismatch = on_schema_mismatch  # (user_id, the statistics' schema)
        self._mismatch_logged = False
        self.store = store
        self.bank = bank
        self.seed = seed
        self.capacity = capacity
        self.on_unreadable = on_unreadable  # (user_id, version), once per version
        self._cache: OrderedDict[str, UserModel] = OrderedDict()
        self._unreadable: set[tuple[str, int]] = set()

    def get(self, user_id: str) -> UserModel:
        versions = self.store.versions(user_id)
        newest = versions[-1] if versions else 0
        cached = self._cache.get(user_id)
        if cached is not None and cached.version == newest:
            self._cache.move_to_end(user_id)
            return cached
        model = self._load(user_id, newest)
        self._cache[user_id] = model
        while len(self._cache) > self.capacity:
            self._cache.popitem(last=False)
        return model

    def _load(self, user_id: str, newest: int) -> UserModel:
        """The user's model from the newest version whose weights *and* learner state both
        read, so the weights and what they learnt from (applied offsets and request ids,
        optimiser, baseline, guard) always come from one version: weights of one version
        with the applied offsets of an older one would learn the newer samples twice. It is
        numbered `newest` all the same (the next version is written after it)."""
        for v in sorted((v for v in self.store.versions(user_id) if v <= newest), reverse=True):
            try:
                state = self.store.learner_state(user_id, v)
                weights = read_peft_dir(self.store.get(user_id, v).path)
            except (ValueError, AdapterStoreError) as exc:
                self._unreadable_version(user_id, v, exc)
                continue
            bandit, others = self._bandit(user_id, state)
            return UserModel(
                user_id,
                newest,
                weights,
                bandit,
                baseline=float(state.get("baseline", 0.0)),
                updates=int(state.get("updates", 0)),
                rollbacks=int(state.get("rollbacks", 0)),
                applied=list(state.get("applied_request_ids", [])),
                guard=GuardState.from_json(state.get("guard")),
                offsets=AppliedOffsets.from_json(state.get("applied_offsets")),
                loaded_from=v,
                other_bandits=others,
            )
        return UserModel(
            user_id,
            newest,
            initial_weights(self.bank, user_id, self.seed),
            BanditState(self.arms, self.schema.dim, self.schema.fingerprint),
        )

    def _bandit(
        self, user_id: str, state: dict[str, Any]
    ) -> tuple[BanditState, dict[str, dict[str, Any]]]:
        """The user's statistics over the learner's context schema, and those over other
        schemas (kept as stored). Statistics over another schema are set aside under their
        fingerprint, and the learner's schema's own, if set aside earlier, come back."""
        fingerprint, dim = self.schema.fingerprint, self.schema.dim
        stored = state.get("bandit_other_schemas")
        others = dict(stored) if isinstance(stored, dict) else {}
        data = state.get("bandit")
        recorded = BanditState.json_schema(data)
        if isinstance(data, dict) and recorded != fingerprint:
            if int(data.get("_seq", 0)):  # it holds statistics: keep them
                others[recorded] = data
                self._schema_mismatch(user_id, recorded)
            data = others.pop(fingerprint, None)
        bandit = BanditState.from_json(data, self.arms, dim, fingerprint)
        return bandit, others

    def _schema_mismatch(self, user_id: str, recorded: str) -> None:
        if not self._mismatch_logged:
            self._mismatch_logged = True
            log.warning(
                "%s: bandit statistics over context schema %s, this learner uses %s (%s): "
                "kept in the learner state under bandit_other_schemas and not used; the "
                "learner's schema's own statistics are restored if it has any (this is "
                "logged once, and counted for every user)",
                user_id,
                recorded[:80],
                self.schema.fingerprint,
                self.schema.describe(),
            )
        if self.on_schema_mismatch is not None:
            self.on_schema_mismatch(user_id, recorded)

    def _unreadable_version(self, user_id: str, version: int, error: Exception) -> None:
        if (user_id, version) in self._unreadable:
            return
        self._unreadable.add((user_id, version))
        log.error(
            "%s v%d is unreadable, learning on from an older version: %s", user_id, version, error
        )
        if self.on_unreadable is not None:
            self.on_unreadable(user_id, version)

    def weights_of(self, user_id: str, version: int) -> LoRAWeights:
        """A stored version's weights (version 0: the user's initial adapter, the base).

        An unreadable version is skipped for the newest older one that reads, down to the
        initial adapter: a corrupt file costs that version's progress, never the learner."""
        for v in sorted((v for v in self.store.versions(user_id) if v <= version), reverse=True):
            try:
                return read_peft_dir(self.store.get(user_id, v).path)
            except (ValueError, AdapterStoreError) as exc:
                self._unreadable_version(user_id, v, exc)
        return initial_weights(self.bank, user_id, self.seed)

    def commit(self, model: UserModel, base_model: str, targets: list[str]) -> AdapterVersion:
        """Write the model as its next version (atomic) and cache it under that version."""
        version = model.version + 1
        stored = self.store.write(
            model.user_id, version, to_peft_files(model.weights, base_model, targets), model.state()
        )
        model.version = version
        self._cache[model.user_id] = model
        return stored

    def adopt(self, model: UserModel, stored: AdapterVersion) -> AdapterVersion:
        """Cache the model as `stored`, its version that is in the store already (an
        earlier `commit` of it renamed it into place, then failed)."""
        model.version = stored.version
        self._cache[model.user_id] = model
        return stored

    def forget(self, user_id: str) -> None:
        self._cache.pop(user_id, None)

    def drop_user(self, user_id: str) -> None:
        """A deleted user: forget the cached model and every note about their versions."""
        self.forget(user_id)
        self._unreadable = {key for key in self._unreadable if key[0] != user_id}
