"""Continuous batching for a transformers causal LM: rows join and leave at every step.

`RunningBatch` owns the KV cache, attention mask and positions of the requests being
decoded. New requests are prefilled together (each row through its own adapter slot),
then merged into the running batch; a finished row is dropped from the cache before the
next step. Every row is left-padded, so real tokens are contiguous at the right and one
`[rows, 1]` forward decodes everyone, whatever adapter each row uses.

The cache is transformers' `DynamicCache` with layers that grow in place (amortised
doubling) instead of concatenating the whole cache at every step.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import DynamicCache, DynamicLayer

from loraloop.core.multi_lora import LoRABank

_GROW = 64  # capacity granularity, in tokens


class GrowingLayer(DynamicLayer):
    """A `DynamicLayer` whose keys/values are views of a buffer with spare capacity."""

    def __init__(self, **kwargs: object) -> None:
        super().__init__(**kwargs)
        self._kbuf: torch.Tensor | None = None
        self._vbuf: torch.Tensor | None = None
        self._len = 0

    def _ensure(self, like: torch.Tensor, rows: int, length: int) -> None:
        if self._kbuf is not None and self._kbuf.shape[2] >= length:
            return
        cap = max(_GROW, ((length * 2 + _GROW - 1) // _GROW) * _GROW)
        shape = (rows, like.shape[1], cap, like.shape[3])
        kbuf = like.new_zeros(shape)
        vbuf = like.new_zeros(shape)
        if self._kbuf is not None and self._len:
            kbuf[:, :, : self._len] = self._kbuf[:, :, : self._len]
            vbuf[:, :, : self._len] = self._vbuf[:, :, : self._len]  # type: ignore[index]
        self._kbuf, self._vbuf = kbuf, vbuf

    def set(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Replace the layer's contents (used after merging or selecting rows)."""
        self.dtype, self.device = keys.dtype, keys.device
        self.is_initialized = True
        self._kbuf = self._vbuf = None
        self._len = 0
        self._ensure(keys, keys.shape[0], keys.shape[2])
        assert self._kbuf is not None and self._vbuf is not None
        n = keys.shape[2]
        self._kbuf[:, :, :n] = keys
        self._vbuf[:, :, :n] = values
        self._len = n
        self.keys, self.values = self._kbuf[:, :, :n], self._vbuf[:, :, :n]

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: object, **kwargs: object
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.is_initialized or self._kbuf is None:
            self.set(key_states, value_states)
            return self.kv()
        end = self._len + key_states.shape[2]
        self._ensure(key_states, key_states.shape[0], end)
        assert self._kbuf is not None and self._vbuf is not None
        self._kbuf[:, :, self._len : end] = key_states
        self._vbuf[:, :, self._len : end] = value_states
        self._len = end
        self.keys, self.values = self._kbuf[:, :, :end], self._vbuf[:, :, :end]
        return self.kv()

    def get_seq_length(self) -> int:
        return self._len if self.is_initialized else 0

    def kv(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The layer's keys and values (set once the layer holds rows)."""
        assert self.keys is not None and self.values is not None, "an empty cache layer"
        return self.keys, self.values


def _new_cache() -> DynamicCache:
    cache = DynamicCache()
    cache.layer_class_to_replicate = GrowingLayer
    return cache


def _layers(cache: DynamicCache) -> list[GrowingLayer]:
    return cache.layers  # type: ignore[return-value]


class RunningBatch:
    """The rows being decoded together: KV cache, mask, positions and adapter slots.

    `add` prefills new rows and returns their next-token logits; `step` feeds one token per
    row and returns every row's next-token logits; `keep` drops rows. With a `bank`, each
    row runs through its own adapter slot (`slots`); without one (a plain model), slots are
    ignored.
    """

    def __init__(self, model: torch.nn.Module, bank: LoRABank | None, pad_id: int) -> None:
        self.model = model
        self.bank = bank
        self.pad_id = pad_id
        self.device = next(model.parameters()).device
        self.cache: DynamicCache | None = None
        self.mask = self._longs((0, 0))
        self.positions = self._longs(0)  # next position of each row
        self.slots: list[int] = []
        self._bank_rows: list[int] | None = None  # what the bank was last told

    def __len__(self) -> int:
        return len(self.slots)

    def _longs(self, shape: int | tuple[int, ...], fill: int = 0) -> torch.Tensor:
        size = (shape,) if isinstance(shape, int) else shape
        return torch.full(size, fill, dtype=torch.long, device=self.device)

    def _forward(
        self,
        ids: torch.Tensor,
        mask: torch.Tensor,
        positions: torch.Tensor,
        cache: DynamicCache,
        slots: list[int],
    ) -> torch.Tensor:
        # Setting the same rows again would make every layer gather its A/B again.
        if self.bank is not None and slots != self._bank_rows:
            self.bank.set_rows(slots)
            self._bank_rows = list(slots)
        out = self.model(
            input_ids=ids,
            attention_mask=mask,
            position_ids=positions,
            past_key_values=cache,
            use_cache=True,
            logits_to_keep=1,
        )
        return out.logits[:, -1, :]

    def add(self, prompts: list[list[int]], slots: list[int]) -> torch.Tensor:
        """Prefill `prompts` (one row each, through `slots`), join them to the batch and
        return their next-token logits `[len(prompts), vocab]`."""
        n = len(prompts)
        width = max(len(p) for p in prompts)
        ids = torch.full((n, width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((n, width), dtype=torch.long)
        for i, p in enumerate(prompts):
            ids[i, width - len(p) :] = torch.tensor(p, dtype=torch.long)
            mask[i, width - len(p) :] = 1
        ids, mask = ids.to(self.device), mask.to(self.device)  # built on the host, one copy each
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        cache = _new_cache()
        logits = self._forward(ids, mask, positions, cache, list(slots))
        lengths = torch.tensor([len(p) for p in prompts], dtype=torch.long, device=self.device)
        self._merge(cache, mask, lengths, list(slots))
        return logits

    def _merge(
        self, cache: DynamicCache, mask: torch.Tensor, positions: torch.Tensor, slots: list[int]
    ) -> None:
        if self.cache is None or not self.slots:
            self.cache, self.mask, self.positions, self.slots = cache, mask, positions, slots
            return
        old_len, new_len = self.mask.shape[1], mask.shape[1]
        width = max(old_len, new_len)
        for mine, theirs in zip(_layers(self.cache), _layers(cache), strict=True):
            (mk, mv), (tk, tv) = mine.kv(), theirs.kv()
            mine.set(
                torch.cat([_left_pad(mk, width), _left_pad(tk, width)]),
                torch.cat([_left_pad(mv, width), _left_pad(tv, width)]),
            )
        self.mask = torch.cat([_left_pad(self.mask, width), _left_pad(mask, width)])
        self.positions = torch.cat([self.positions, positions])
        self.slots = self.slots + slots

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        """Feed one token per row (`[rows]`) and return next-token logits `[rows, vocab]`."""
        assert self.cache is not None
        tokens = tokens.to(self.device)
        self.mask = torch.cat([self.mask, self._longs((len(self), 1), 1)], dim=1)
        logits = self._forward(
            tokens.view(-1, 1), self.mask, self.positions[:, None], self.cache, self.slots
        )
        self.positions = self.positions + 1
        return logits

    def keep(self, rows: list[int]) -> None:
        """Keep only `rows` (indices into the current batch), in that order."""
        if len(rows) == len(self):
            return
        if not rows:
            self.cache, self.slots = None, []
            self.mask = self._longs((0, 0))
            self.positions = self._longs(0)
            return
        index = torch.tensor(rows, dtype=torch.long, device=self.device)
        mask = self.mask.index_select(0, index)
        # Columns that are padding in every remaining row are dropped from the left.
        first = int(mask.any(0).nonzero()[0])
        self.mask = mask[:, first:]
        assert self.cache is not None
        for layer in _layers(self.cache):
            keys, values = layer.kv()
            layer.set(
                keys.index_select(0, index)[:, :, first:],
                values.index_select(0, index)[:, :, first:],
            )
        self.positions = self.positions.index_select(0, index)
        self.slots = [self.slots[i] for i in rows]


def _left_pad(t: torch.Tensor, width: int) -> torch.Tensor:
    """Zero-pad dimension 2 (a cache) or 1 (a mask) of `t` on the left up to `width`."""
    dim = 2 if t.dim() == 4 else 1
    missing = width - t.shape[dim]
    if missing == 0:
        return t
    shape = list(t.shape)
    shape[dim] = missing
    return torch.cat([t.new_zeros(shape), t], dim=dim)
