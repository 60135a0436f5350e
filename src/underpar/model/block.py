"""The residual block: pre-norm attention and MLP branches, each scaled per dim, on a stream
re-mixed with the initial embedding."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from underpar.model.attention import AttentionConfig, CausalSelfAttention
from underpar.model.linear import RMSNorm
from underpar.model.mlp import MLP, MLPConfig


class Block(nn.Module):
    """Pre-norm residual block. Before attention, the stream is re-mixed with the initial
    embedding x0 by learned per-dim weights (`resid_mix`, init: all stream, no x0); each
    branch output is scaled per dim (`attn_scale`, `mlp_scale`, init 1)."""

    def __init__(self, dim: int, attention: AttentionConfig, mlp: MLPConfig):
        super().__init__()
        # Creation order fixes the parameter init order (and so the weights a seed gives).
        self.attn_norm = RMSNorm()
        self.mlp_norm = RMSNorm()
        self.attn = CausalSelfAttention(dim, attention)
        self.mlp = MLP(dim, mlp)
        self.attn_scale = nn.Parameter(torch.ones(dim, dtype=torch.float32))
        self.mlp_scale = nn.Parameter(torch.ones(dim, dtype=torch.float32))
        self.resid_mix = nn.Parameter(torch.stack((torch.ones(dim), torch.zeros(dim))).float())

    def forward(self, x_btd: Tensor, x0_btd: Tensor) -> Tensor:
        mix = self.resid_mix.to(x_btd.dtype)
        x = mix[0][None, None, :] * x_btd + mix[1][None, None, :] * x0_btd
        x = x + self.attn_scale.to(x.dtype)[None, None, :] * self.attn(self.attn_norm(x))
        x = x + self.mlp_scale.to(x.dtype)[None, None, :] * self.mlp(self.mlp_norm(x))
        return x
