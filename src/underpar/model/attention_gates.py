"""Attention output gates (`model.attention.gate`): a per-token, per-head sigmoid gate computed
from the attention's input and applied to each head's output before the output projection.

    none     no gate (the baseline)
    sparse   the leaderboard's sparse attention gate (modded-nanogpt style): the gate reads
             only the first `window` (12) dims of the input, W: [heads, window], zero init
    dense    gated attention (Qiu et al. 2025, headwise G1): the gate reads the whole input,
             W: [heads, model_dim]

    g[b, t, h] = sigmoid(scale * x[b, t, :inputs] . W[h])      y[b, h, t, :] *= g[b, t, h]

Zero init gives g = 0.5 everywhere at the start (the records' "transparent-ish" cold start; the
output projection starts at zero anyway). The weight is named `attn_gate_w` (a control tensor:
Adam at the scalar LR, fp32 in training and in the artifact, as the records route it).
An `init_std > 0` draws the weight from the global RNG, which shifts every later init.
"""

from __future__ import annotations

import dataclasses
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import Tensor

from underpar.config import bounded
from underpar.registry import Registry

ATTENTION_GATES: Registry[type] = Registry("attention_gate")


class AttentionGate(Protocol):
    """A gate's parameters. Gates that read any input (inputs > 0) also carry `scale` and
    `init_std`."""

    def inputs(self, model_dim: int) -> int:
        """How many leading dims of the attention input the gate reads (0: no gate)."""
        ...


def init_gate_weight(num_heads: int, inputs: int, init_std: float) -> Tensor:
    if init_std > 0:
        return torch.randn(num_heads, inputs) * init_std
    return torch.zeros(num_heads, inputs)


def head_gates(x_btd: Tensor, weight_hk: Tensor, scale: float) -> Tensor:
    """The gates [B, heads, T, 1] for outputs laid out [B, heads, T, head_dim]."""
    inputs = weight_hk.size(1)
    logits_bth = F.linear(x_btd[..., :inputs], weight_hk.to(x_btd.dtype))
    if scale != 1.0:
        logits_bth = logits_bth * scale
    return torch.sigmoid(logits_bth).transpose(1, 2).unsqueeze(-1)


@ATTENTION_GATES.register("none")
@dataclasses.dataclass
class NoGate:
    def inputs(self, model_dim: int) -> int:
        return 0


@ATTENTION_GATES.register("sparse")
@dataclasses.dataclass
class SparseGate:
    # Leading input dims the gate reads (the records' GATE_WINDOW).
    window: int = bounded(12, 1)
    # Multiplies the gate logits (the records' SPARSE_ATTN_GATE_SCALE: 1.0, one record 0.5).
    scale: float = bounded(1.0, 0.0)
    init_std: float = bounded(0.0, 0.0)

    def inputs(self, model_dim: int) -> int:
        return self.window


@ATTENTION_GATES.register("dense")
@dataclasses.dataclass
class DenseGate:
    scale: float = bounded(1.0, 0.0)
    # The records' GATED_ATTN_INIT_STD is 0.005; 0 keeps every other init unchanged.
    init_std: float = bounded(0.0, 0.0)

    def inputs(self, model_dim: int) -> int:
        return model_dim
