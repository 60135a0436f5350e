"""Deep Chaos `slice_form = "pack"`: each sliced projection trains a packed copy of its kept
sub-matrix for one block (model/sliced.py `PackedLinear`), and this module keeps the full model
and the optimizer in step with those copies.

A block's `Packs` lives from the block's start to its end:
- `attach(model)`: after the "slice" strategy hoisted the model, each `SlicedLayer` runs on
  packed copies of its projections (made once per block; a re-apply after `restored()` reuses
  them, refreshed from the full weights, so the optimizer's references stay valid).
- `freeze_sources()`: the full weights behind the copies sit out (`requires_grad` False: no
  gradient, AdamW skips them, DDP does not reduce them).
- `join(optimizer)`: the copies become one extra parameter group (the optimizer's defaults; the
  loop sets every group's lr). Their state is gathered from the full parameters' state where it
  exists (kept entries' moments, the full parameter's step), so training across blocks keeps
  the moments of kept entries.
- `write_back()`: the copies' values into the full weights (before the full model is used).
- `leave(optimizer, ...)`: at the block's end, the copies' moments scattered into the full
  parameters' state (made, zero elsewhere, where there is none; the full step becomes the copy's)
  and the group and its state removed.

Entries that are not kept do not move during the block: no gradient, no momentum, no weight
decay, and their moments stay as they were (the "gather" form instead gives them zero
gradients, on which AdamW momentum and weight decay still act, and decays their moments). The
full parameter's step (bias correction) is one scalar: it advances with the block's steps.
optimizer_state: "keep" as above; "offload": the full parameters' state sits on the host while
they sit out (moments made for them at a block's end are made there); "reset": the full
weights behind the copies sit out, so their state is dropped once the copies have gathered from
it, and a copy's moments last one block (the gather form keeps a layer's moments while it stays
active in consecutive blocks).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from underpar.model import surgery
from underpar.model.sliced import PackedLinear, SlicedLayer, _gather, _put


class Packs:
    """One block's packed copies, by the full linear they copy."""

    def __init__(self) -> None:
        self.by_linear: dict[nn.Linear, PackedLinear] = {}
        self.group: dict | None = None  # the optimizer's parameter group of the copies

    def __bool__(self) -> bool:
        return bool(self.by_linear)

    def parts(self) -> list[tuple[nn.Parameter, nn.Parameter, torch.Tensor | None, torch.Tensor | None]]:
        return [part for packed in self.by_linear.values() for part in packed.parts()]

    def attach(self, model: nn.Module) -> None:
        for layer in surgery.decoder_of(model).layers:
            if isinstance(layer, SlicedLayer):
                layer.pack(self.by_linear)

    def freeze_sources(self) -> None:
        for packed, full, _, _ in self.parts():
            full.requires_grad_(False)
            full.grad = None
            packed.requires_grad_(True)

    def write_back(self) -> None:
        for packed in self.by_linear.values():
            packed.write_back()

    def join(self, optimizer: torch.optim.Optimizer) -> None:
        """The copies train in `optimizer` (a new group), starting from the full state's kept entries."""
        if self.group is not None:
            return
        for packed, full, rows, cols in self.parts():
            state = optimizer.state.get(full)
            if state:
                optimizer.state[packed] = {k: _gather(v, *_on(v, rows, cols)).to(packed.device) if _whole(v, full)
                                           else _copy(v) for k, v in state.items()}
        optimizer.add_param_group({"params": [packed for packed, _, _, _ in self.parts()]})
        self.group = optimizer.param_groups[-1]

    def leave(self, optimizer: torch.optim.Optimizer, keep_state: bool,
              new_state: Callable[[torch.Tensor, str, torch.Tensor], torch.Tensor]) -> None:
        """Take the copies out of `optimizer`; `keep_state`: scatter their moments into the full
        parameters' state first (`new_state(full, key, like)` makes a full-size zero tensor
        where the full parameter has none)."""
        if self.group is None:
            return
        for packed, full, rows, cols in self.parts():
            state = optimizer.state.pop(packed, None)
            if not state or not keep_state:
                continue
            target = optimizer.state[full]
            for key, value in state.items():
                if not _whole(value, packed):
                    target[key] = _copy(value)  # 'step': the full parameter's, advanced by this block's
                    continue
                if key not in target:
                    target[key] = new_state(full, key, value)
                _put(target[key], value.to(target[key].device), *_on(target[key], rows, cols))  # offloaded: host
        optimizer.param_groups[:] = [g for g in optimizer.param_groups if g is not self.group]
        self.group = None


def _whole(value: object, p: torch.Tensor) -> bool:
    """A per-entry state tensor of `p` (moments), not a scalar such as 'step'."""
    return torch.is_tensor(value) and value.shape == p.shape and value.dim() > 0


def _on(like: torch.Tensor, *indices: torch.Tensor | None) -> list[torch.Tensor | None]:
    """`indices` on `like`'s device (state offloaded to the host is indexed there)."""
    return [None if i is None else i.to(like.device) for i in indices]


def _copy(value: object) -> object:
    return value.clone() if torch.is_tensor(value) else value
