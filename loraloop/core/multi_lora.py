"""Batched multi-LoRA: many users' adapters in one forward (and backward) pass.

Each target `nn.Linear` is wrapped by `MultiLoRALinear`, which holds every resident
adapter's weights stacked into one tensor per layer (`A: [slots, r, in]`,
`B: [slots, out, r]`) and a per-row slot index shared by all layers. A batch whose rows
belong to different users runs as one matmul for the base weights plus one `bmm` pair for
the adapters, never a loop over adapters. Slot 0 is the all-zero adapter (the base model).

Serving uses it to decode mixed-user batches; the learner uses the same layer, with the
bank's tensors as trainable parameters, to update many users in one backward pass.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn

BASE_SLOT = 0


@dataclass
class LoRAWeights:
    """One adapter: per target module name, `A [r, in]` and `B [out, r]`."""

    rank: int
    alpha: float
    a: dict[str, torch.Tensor] = field(default_factory=dict)
    b: dict[str, torch.Tensor] = field(default_factory=dict)

    @property
    def scaling(self) -> float:
        return self.alpha / self.rank


class _RowSlots:
    """The slot index of each batch row, shared by every wrapped layer of one model."""

    def __init__(self) -> None:
        self.ids: torch.Tensor | None = None
        self.generation = 0


class MultiLoRALinear(nn.Module):
    """`base(x) + scaling * B[slot(row)] @ A[slot(row)] @ x` for every row of a batch."""

    def __init__(self, base: nn.Linear, slots: int, rank: int, scaling: float, rows: _RowSlots):
        super().__init__()
        self.base = base
        self.scaling = scaling
        self._rows = rows
        dtype, device = base.weight.dtype, base.weight.device
        self.lora_A = nn.Parameter(
            torch.zeros(slots, rank, base.in_features, dtype=dtype, device=device),
            requires_grad=False,
        )
        self.lora_B = nn.Parameter(
            torch.zeros(slots, base.out_features, rank, dtype=dtype, device=device),
            requires_grad=False,
        )
        # Gathered per-row A/B reused across the forwards of one decode (same row slots).
        self._gathered: tuple[int, torch.Tensor, torch.Tensor] | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base(x)
        ids = self._rows.ids
        if ids is None:
            return out
        if not torch.is_grad_enabled():
            return self._serve(x, out, ids)
        # Training: scale the small gathered B, not the [rows, seq, out] product, and add
        # into the base output with one baddbmm (out-of-place: autograd needs `out`).
        a = self.lora_A[ids].transpose(1, 2)  # [rows, in, r]
        b = self.lora_B[ids].transpose(1, 2) * self.scaling  # [rows, r, out]
        if x.dim() == 2:
            return torch.baddbmm(out.unsqueeze(1), torch.bmm(x.unsqueeze(1), a), b).squeeze(1)
        return torch.baddbmm(out, torch.bmm(x, a), b)

    def _serve(self, x: torch.Tensor, out: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """Inference: per-row A and scaled B gathered once per row assignment and reused by
        every forward until the rows change; the update is one `bmm` and one `baddbmm`."""
        cached = self._gathered
        if cached is not None and cached[0] == self._rows.generation:
            a, b = cached[1], cached[2]
        else:
            # Layouts chosen by measurement (CPU, rank 8): A as a transposed view of
            # [rows, r, in] and B contiguous [rows, r, out] are 3x faster than the others.
            a = self.lora_A[ids].transpose(1, 2)  # [rows, in, r], a view
            b = (self.lora_B[ids].transpose(1, 2) * self.scaling).contiguous()  # [rows, r, out]
            self._gathered = (self._rows.generation, a, b)
        # `out` is this call's fresh base output: adding in place saves a copy.
        if x.dim() == 2:
            return out.unsqueeze(1).baddbmm_(torch.bmm(x.unsqueeze(1), a), b).squeeze(1)
        return out.baddbmm_(torch.bmm(x, a), b)


class LoRABank:
    """All `MultiLoRALinear` layers of one model, addressed by module name and slot."""

    def __init__(self, model: nn.Module, targets: list[str], slots: int, rank: int, alpha: float):
        if slots < 2:
            raise ValueError("a LoRA bank needs at least 2 slots (slot 0 is the base model)")
        self.slots, self.rank, self.alpha = slots, rank, alpha
        self._rows = _RowSlots()
        self.layers: dict[str, MultiLoRALinear] = {}
        for name, module in list(model.named_modules()):
            leaf = name.rsplit(".", 1)[-1]
            if leaf in targets and isinstance(module, nn.Linear):
                parent = model.get_submodule(name.rsplit(".", 1)[0]) if "." in name else model
                wrapped = MultiLoRALinear(module, slots, rank, alpha / rank, self._rows)
                setattr(parent, leaf, wrapped)
                self.layers[name] = wrapped
        if not self.layers:
            raise ValueError(f"no nn.Linear named any of {targets} in the model: set lora_targets")

    @property
    def scaling(self) -> float:
        return self.alpha / self.rank

    @property
    def device(self) -> torch.device:
        """The device of the bank's A/B stacks: the base model's."""
        return next(iter(self.layers.values())).lora_A.device

    @property
    def dtype(self) -> torch.dtype:
        """The dtype of the bank's A/B stacks: the base model's."""
        return next(iter(self.layers.values())).lora_A.dtype

    def set_rows(self, slot_ids: torch.Tensor | list[int] | None) -> None:
        """Select the adapter of every batch row for the following forward passes."""
        if slot_ids is not None and not isinstance(slot_ids, torch.Tensor):
            slot_ids = torch.tensor(slot_ids, dtype=torch.long, device=self.device)
        elif slot_ids is not None:
            slot_ids = slot_ids.to(self.device)
        self._rows.ids = slot_ids
        self._rows.generation += 1

    @contextmanager
    def rows(self, slot_ids: torch.Tensor | list[int] | None) -> Iterator[None]:
        self.set_rows(slot_ids)
        try:
            yield
        finally:
            self.set_rows(None)

    def parameters(self) -> list[nn.Parameter]:
        return [p for layer in self.layers.values() for p in (layer.lora_A, layer.lora_B)]

    @torch.no_grad()
    def load(self, slot: int, weights: LoRAWeights) -> None:
        """Copy an adapter into a slot. Lower ranks are zero-padded; the adapter's own
        scaling is folded into B, so any rank/alpha up to the bank's rank serves the same
        adapter (folding rounds each B weight once unless the ratio of scalings is a power
        of two). The weights may be on any device (the host-RAM cache and the learner keep
        them on the CPU): they are copied to the bank's device and dtype."""
        self._check_slot(slot)
        if weights.rank > self.rank:
            raise ValueError(
                f"adapter rank {weights.rank} exceeds the bank's rank {self.rank}: raise lora_rank"
            )
        factor = weights.scaling / self.scaling
        for name, layer in self.layers.items():
            layer.lora_A[slot].zero_()
            layer.lora_B[slot].zero_()
            if name in weights.a:
                r = weights.rank
                layer.lora_A[slot, :r].copy_(weights.a[name])
                layer.lora_B[slot, :, :r].copy_(weights.b[name].to(layer.lora_B.device) * factor)
            layer._gathered = None

    def clear(self, slot: int) -> None:
        self.load(slot, LoRAWeights(self.rank, self.alpha))

    @torch.no_grad()
    def read(self, slot: int) -> LoRAWeights:
        """A copy of a slot's adapter, at the bank's rank and alpha."""
        self._check_slot(slot)
        weights = LoRAWeights(self.rank, self.alpha)
        for name, layer in self.layers.items():
            weights.a[name] = layer.lora_A[slot].detach().clone()
            weights.b[name] = layer.lora_B[slot].detach().clone()
        return weights

    def _check_slot(self, slot: int) -> None:
        if not 0 < slot < self.slots:
            raise ValueError(f"slot {slot} out of range 1..{self.slots - 1} (0 is the base)")
