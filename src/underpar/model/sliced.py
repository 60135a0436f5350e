"""Sliced sub-networks (Deep Chaos, strategy "slice"): an active layer runs only its kept KV
heads (with their query groups), kept MLP channel groups and kept output ("hidden") groups as
smaller matmuls, instead of full-size matmuls whose outputs masks then zero.

Two forms (`method.slice_form`):
- "gather": the weights are not copied into new parameters: `sliced_linear` gathers the kept
  rows/columns of the full weight in its forward and again in its backward (nothing gathered is
  kept for the backward), and scatters the gradient back into a full-size gradient of the
  original parameter, so the optimizer, checkpoints and `restore` see the usual parameters.
- "pack": `PackedLinear` copies the kept sub-matrix (and bias rows) once per block into a
  contiguous parameter that the forward uses directly (plain `F.linear`); `write_back` puts its
  values into the full weight (the controller does so before the full model is used, and at the
  block's end; tracks/chaos_pack.py moves the optimizer state).
Numerically both are the masked forward with the zero rows left out: same outputs to rounding,
same gradients of kept weights (gather: exact zeros elsewhere). Eager (no compile); the shapes
change every block.
"""

from __future__ import annotations

import sys
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

try:  # gradient checkpointing support for the wrappers (transformers >= 4.52)
    from transformers.modeling_layers import GradientCheckpointingLayer as _LayerBase
except ImportError:  # pragma: no cover
    _LayerBase = nn.Module


class _SlicedLinear(torch.autograd.Function):
    """y = x @ W[rows][:, cols].T + b[rows]; `None` rows / cols = all of them."""

    @staticmethod
    def forward(ctx, x, weight, bias, rows, cols):
        ctx.save_for_backward(x, weight, rows, cols)
        ctx.bias_shape = None if bias is None else bias.shape
        b = None if bias is None or _opt(rows) is None else bias.index_select(0, rows)
        return F.linear(x, _gather(weight, rows, cols), bias if _opt(rows) is None else b)

    @staticmethod
    def backward(ctx, grad_y):
        x, weight, rows, cols = ctx.saved_tensors
        rows, cols = _opt(rows), _opt(cols)
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = grad_y @ _gather(weight, rows, cols)  # gathered again: nothing kept from forward
        g_y = grad_y.reshape(-1, grad_y.shape[-1])
        if ctx.needs_input_grad[1]:
            grad_w = _scatter(g_y.t() @ x.reshape(-1, x.shape[-1]), weight.shape, rows, cols)
        if ctx.bias_shape is not None and ctx.needs_input_grad[2]:
            g = g_y.sum(0)
            grad_b = g if rows is None else g.new_zeros(ctx.bias_shape).index_copy_(0, rows, g)
        return grad_x, grad_w, grad_b, None, None


_ALL = torch.empty(0, dtype=torch.long)  # saved in place of None (save_for_backward needs tensors)


def _opt(index: torch.Tensor | None) -> torch.Tensor | None:
    return None if index is None or index.numel() == 0 else index


def _gather(weight: torch.Tensor, rows: torch.Tensor | None, cols: torch.Tensor | None) -> torch.Tensor:
    rows, cols = _opt(rows), _opt(cols)
    w = weight if rows is None else weight.index_select(0, rows)
    return w if cols is None else w.index_select(1, cols)


def _scatter(g: torch.Tensor, shape: torch.Size, rows: torch.Tensor | None, cols: torch.Tensor | None) -> torch.Tensor:
    if rows is None and cols is None:
        return g
    full = g.new_zeros(shape)
    if cols is None:
        return full.index_copy_(0, rows, g)
    if rows is None:
        return full.index_copy_(1, cols, g)
    wide = g.new_zeros(len(rows), shape[1]).index_copy_(1, cols, g)  # two copies beat a 2-D index_put
    return full.index_copy_(0, rows, wide)


def _put(full: torch.Tensor, part: torch.Tensor, rows: torch.Tensor | None, cols: torch.Tensor | None) -> None:
    """full[rows][:, cols] = part, in place (the inverse of `_gather`)."""
    rows, cols = _opt(rows), _opt(cols)
    if cols is None:
        full.copy_(part) if rows is None else full.index_copy_(0, rows, part)
    elif rows is None:
        full.index_copy_(1, cols, part)
    else:  # two copies (a 2-D index_put would broadcast an index per entry)
        full.index_copy_(0, rows, full.index_select(0, rows).index_copy_(1, cols, part))


class PackedLinear(nn.Module):
    """A contiguous trainable copy of `source`'s kept output `rows` and input `cols` (slice_form
    "pack"): `weight` = source.weight[rows][:, cols], `bias` = source.bias[rows]. `source` is not
    a submodule (its parameters stay the full model's); `write_back` / `refresh` copy the values
    to / from it. `parts()` pairs each packed parameter with its source parameter."""

    def __init__(self, source: nn.Linear, rows: torch.Tensor | None, cols: torch.Tensor | None):
        super().__init__()
        self.__dict__["source"] = source
        self.rows, self.cols = _opt(rows), _opt(cols)
        with torch.no_grad():
            self.weight = nn.Parameter(_gather(source.weight, rows, cols).clone())
            self.bias = None if source.bias is None else nn.Parameter(_gather(source.bias, rows, None).clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)

    def parts(self) -> list[tuple[nn.Parameter, nn.Parameter, torch.Tensor | None, torch.Tensor | None]]:
        """(packed, full, rows, cols) per parameter (a bias has rows only)."""
        out = [(self.weight, self.source.weight, self.rows, self.cols)]
        if self.bias is not None:
            out.append((self.bias, self.source.bias, self.rows, None))
        return out

    @torch.no_grad()
    def write_back(self) -> None:
        for packed, full, rows, cols in self.parts():
            _put(full, packed, rows, cols)

    @torch.no_grad()
    def refresh(self) -> None:
        for packed, full, rows, cols in self.parts():
            packed.copy_(_gather(full, rows, cols))


def sliced_linear(x: torch.Tensor, linear: nn.Linear, rows: torch.Tensor | None = None,
                  cols: torch.Tensor | None = None) -> torch.Tensor:
    """`linear` restricted to output `rows` and input `cols` (LongTensors; None = all)."""
    return _SlicedLinear.apply(x, linear.weight, linear.bias, _ALL if rows is None else rows,
                               _ALL if cols is None else cols)


def units_to_rows(units: list[int], size: int, device: torch.device) -> torch.Tensor:
    """Row indices of the kept units (heads, channel groups) of `size` rows each."""
    return torch.tensor([u * size + j for u in units for j in range(size)], dtype=torch.long, device=device)


class SlicedLayer(_LayerBase):
    """A decoder layer restricted to one block's kept units: `x + scatter(attn_kept(norm(x)))`
    and/or `x + scatter(mlp_kept(norm(x)))` (`mode` "both", "attn" or "mlp"). Holds the layer's
    own modules (shared, no copies) and the kept row indices; same call signature as the layer.
    `skipped`: a frozen bias standing in for the half that "attn" / "mlp" skips. `packed`
    (slice_form "pack", set by `pack`): a `PackedLinear` per projection, used instead of
    gathering from the full weights."""

    def __init__(self, layer: nn.Module, mode: str, kept: dict[str, torch.Tensor],
                 skipped: torch.Tensor | None = None):
        super().__init__()
        self.mode, self.kept = mode, kept
        self.packed: nn.ModuleDict | None = None
        self.register_buffer("skipped", skipped, persistent=False)
        if mode in ("both", "attn"):
            self.input_layernorm, self.self_attn = layer.input_layernorm, layer.self_attn
        if mode in ("both", "mlp"):
            self.post_attention_layernorm, self.mlp = layer.post_attention_layernorm, layer.mlp
        self.gradient_checkpointing = getattr(layer, "gradient_checkpointing", False)
        if hasattr(layer, "_gradient_checkpointing_func"):
            self._gradient_checkpointing_func = layer._gradient_checkpointing_func
        self._projections = self._find_projections()  # fixed for the block: not rebuilt per call

    def projections(self) -> dict[str, tuple[nn.Linear, torch.Tensor | None, torch.Tensor | None]]:
        """name -> (the full linear, kept output rows, kept input cols; None = all) of what runs."""
        return self._projections

    def _find_projections(self) -> dict[str, tuple[nn.Linear, torch.Tensor | None, torch.Tensor | None]]:
        k, out = self.kept, {}
        if self.mode in ("both", "attn"):
            a = self.self_attn
            out |= {"q_proj": (a.q_proj, k["q"], None), "k_proj": (a.k_proj, k["kv"], None),
                    "v_proj": (a.v_proj, k["kv"], None), "o_proj": (a.o_proj, k["attn_out"], k["q"])}
        if self.mode in ("both", "mlp"):
            m = self.mlp
            out |= {"gate_proj": (m.gate_proj, k["mlp"], None), "up_proj": (m.up_proj, k["mlp"], None),
                    "down_proj": (m.down_proj, k["mlp_out"], k["mlp"])}
        return out

    def pack(self, reuse: dict[nn.Linear, PackedLinear]) -> list[PackedLinear]:
        """Run on packed copies: one `PackedLinear` per projection, taken from `reuse` (by full
        linear; refreshed from the full weights) or made and added there."""
        packed = {}
        for name, (linear, rows, cols) in self.projections().items():
            if linear in reuse:
                reuse[linear].refresh()
            else:
                reuse[linear] = PackedLinear(linear, rows, cols)
            packed[name] = reuse[linear]
        self.packed = nn.ModuleDict(packed)
        return list(packed.values())

    def linear(self, x: torch.Tensor, name: str) -> torch.Tensor:
        """Projection `name` over the kept units: the packed copy, or gathered from the full weight."""
        if self.packed is not None:
            return self.packed[name](x)
        linear, rows, cols = self._projections[name]
        return sliced_linear(x, linear, rows, cols)

    def forward(self, hidden_states: torch.Tensor, attention_mask: Any = None, position_embeddings: Any = None,
                **kwargs: Any) -> torch.Tensor:
        h, k = hidden_states, self.kept
        if self.mode in ("both", "attn"):
            y = _attention(self, self.input_layernorm(h), attention_mask, position_embeddings)
            h = h.index_add(-1, k["attn_out"], self.linear(y, "o_proj"))
        if self.skipped is not None:  # in place of the skipped half, where it would add
            h = h + self.skipped
        if self.mode in ("both", "mlp"):
            x = self.post_attention_layernorm(h)
            a = self.mlp.act_fn(self.linear(x, "gate_proj")) * self.linear(x, "up_proj")
            h = h.index_add(-1, k["mlp_out"], self.linear(a, "down_proj"))
        return h


def _attention(layer: SlicedLayer, x: torch.Tensor, attention_mask: Any, position_embeddings: Any) -> torch.Tensor:
    """The Hugging Face attention of `layer.self_attn` over its kept heads only: (batch, seq,
    kept q * head_dim)."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    attn = layer.self_attn
    module = sys.modules[type(attn).__module__]  # the model's own rope and eager attention
    shape = (*x.shape[:-1], -1, attn.head_dim)
    q = layer.linear(x, "q_proj").view(shape).transpose(1, 2)
    k = layer.linear(x, "k_proj").view(shape).transpose(1, 2)
    v = layer.linear(x, "v_proj").view(shape).transpose(1, 2)
    cos, sin = position_embeddings
    q, k = module.apply_rotary_pos_emb(q, k, cos, sin)
    impl = attn.config._attn_implementation
    if impl == "eager":
        interface = module.eager_attention_forward
    else:
        interface = ALL_ATTENTION_FUNCTIONS[impl]
    extra = {"sliding_window": attn.sliding_window} if getattr(attn, "sliding_window", None) else {}
    out, _ = interface(attn, q, k, v, attention_mask, dropout=0.0, scaling=attn.scaling, **extra)
    return out.reshape(*x.shape[:-1], -1)


def kept_rows(plan: Any, i: int, dims: Any, device: torch.device) -> dict[str, torch.Tensor]:
    """Row indices of layer `i`'s kept units under `plan` (a mask plan; see chaos_strategies)."""
    kept = {}
    if i in plan.kv_heads:
        group_q = dims.num_heads // dims.num_kv_heads
        q_heads = [h * group_q + j for h in plan.kv_heads[i] for j in range(group_q)]
        kept["q"] = units_to_rows(q_heads, dims.head_dim, device)
        kept["kv"] = units_to_rows(plan.kv_heads[i], dims.head_dim, device)
        kept["attn_out"] = _clip(units_to_rows(plan.attn_hidden_groups[i], plan.hidden_group_size, device),
                                 dims.hidden_size)
    if i in plan.mlp_groups:
        kept["mlp"] = _clip(units_to_rows(plan.mlp_groups[i], plan.mlp_group_size, device), dims.intermediate_size)
        kept["mlp_out"] = _clip(units_to_rows(plan.mlp_hidden_groups[i], plan.hidden_group_size, device),
                                dims.hidden_size)
    return kept


def _clip(rows: torch.Tensor, size: int) -> torch.Tensor:
    """A last group may be partial (size not a multiple of the group size)."""
    return rows[rows < size]
