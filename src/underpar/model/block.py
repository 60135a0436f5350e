"""The residual block: pre-norm attention and MLP branches, each scaled per dim, on a stream
re-mixed with the initial embedding; sequential, parallel, or on two lanes."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from underpar.model.attention import AttentionConfig, CausalSelfAttention
from underpar.model.linear import RMSNorm
from underpar.model.mlp import MLP, MLPConfig


class Block(nn.Module):
    """Pre-norm residual block. Before attention, the stream is re-mixed with the initial
    embedding x0 by learned per-dim weights (`resid_mix`, init: all stream, no x0); each
    branch output is scaled per dim (`attn_scale`, `mlp_scale`, init 1).

    `ln_scale` multiplies both norm outputs (the records' layerwise LN scale passes
    1/sqrt(layer + 1), a constant, not a parameter). `parallel`: the MLP reads the same
    mixed input as attention instead of the stream after attention, and both outputs are
    added at once (PaLM / GPT-J). `two_lanes`: the block owns the lane routing scalars that
    `forward_lanes` uses. `attention_passes` > 1 (sequential blocks only): the attention
    sublayer runs that many times, same weights, each pass added to the stream (the 131-run
    log's attention recycling, U4). `dropout` (model.dropout > 0): in training mode every
    branch output goes through dropout at the rate in the `dropout_rate` buffer (see `_drop`).
    """

    def __init__(
        self,
        dim: int,
        attention: AttentionConfig,
        mlp: MLPConfig,
        *,
        ln_scale: float = 1.0,
        parallel: bool = False,
        two_lanes: bool = False,
        attention_passes: int = 1,
        dropout: bool = False,
    ):
        super().__init__()
        # Creation order fixes the parameter init order (and so the weights a seed gives).
        self.attn_norm = RMSNorm()
        self.mlp_norm = RMSNorm()
        self.attn = CausalSelfAttention(dim, attention)
        self.mlp = MLP(dim, mlp)
        self.attn_scale = nn.Parameter(torch.ones(dim, dtype=torch.float32))
        self.mlp_scale = nn.Parameter(torch.ones(dim, dtype=torch.float32))
        self.resid_mix = nn.Parameter(torch.stack((torch.ones(dim), torch.zeros(dim))).float())
        self.ln_scale = float(ln_scale)
        self.parallel = parallel
        self.attention_passes = attention_passes
        if two_lanes:
            # [attn lane, mlp lane] decay of each lane's own state (PR #1529's init 1.1), and
            # [sublayer (attn, mlp)][target lane] weights of each output (init 1).
            self.parallel_resid_lambdas = nn.Parameter(torch.full((2,), 1.1, dtype=torch.float32))
            self.parallel_post_lambdas = nn.Parameter(torch.ones(2, 2, dtype=torch.float32))
        # model.dropout's rate: a tensor the compiled graph reads, so GPT.set_dropout changes it
        # without a recompile (metamorphosis decays it); not saved with the weights. None: off.
        self.register_buffer("dropout_rate", torch.zeros(()) if dropout else None, persistent=False)

    def _drop(self, out: Tensor) -> Tensor:
        """Dropout of a branch output in training mode: each element zeroed with probability
        p = `dropout_rate`, the others scaled by 1 / (1 - p) (p = 0: exactly `out`); random draws
        from torch's generator. Off (returned as is) in eval mode and without model.dropout."""
        if self.dropout_rate is None or not self.training:
            return out
        p = self.dropout_rate
        return out * ((torch.rand_like(out, dtype=torch.float32) >= p) / (1 - p)).to(out.dtype)

    def _norm(self, norm: nn.Module, x: Tensor) -> Tensor:
        x = norm(x)
        # A Python constant: the multiply is left out (not traced) when the scale is 1.
        return x * self.ln_scale if self.ln_scale != 1.0 else x

    def _mixed(self, x_btd: Tensor, x0_btd: Tensor) -> Tensor:
        mix = self.resid_mix.to(x_btd.dtype)
        return mix[0][None, None, :] * x_btd + mix[1][None, None, :] * x0_btd

    def forward(self, x_btd: Tensor, x0_btd: Tensor) -> Tensor:
        x = self._mixed(x_btd, x0_btd)
        attn_out = self._drop(self.attn_scale.to(x.dtype)[None, None, :] * self.attn(self._norm(self.attn_norm, x)))
        if self.parallel:
            mlp_out = self._drop(self.mlp_scale.to(x.dtype)[None, None, :] * self.mlp(self._norm(self.mlp_norm, x)))
            return x + attn_out + mlp_out
        x = x + attn_out
        for _ in range(self.attention_passes - 1):
            x = x + self._drop(self.attn_scale.to(x.dtype)[None, None, :] * self.attn(self._norm(self.attn_norm, x)))
        return x + self._drop(self.mlp_scale.to(x.dtype)[None, None, :] * self.mlp(self._norm(self.mlp_norm, x)))

    def forward_lanes(self, lane0: Tensor, lane1: Tensor, x0_btd: Tensor) -> tuple[Tensor, Tensor]:
        """One block on two lanes (PR #1529, the record PR #1584's architecture): attention
        reads lane 0 re-mixed with x0, the MLP reads lane 1 as it is; neither writes back
        before the other has read (parallel in time). Then every output goes to both lanes
        with learned weights:

            lane0' = r_attn * lane0 + p[attn][0] * attn_out + p[mlp][0] * mlp_out
            lane1' = r_mlp  * lane1 + p[attn][1] * attn_out + p[mlp][1] * mlp_out

        with r = `parallel_resid_lambdas`, p = `parallel_post_lambdas`."""
        attn_in = self._mixed(lane0, x0_btd)
        attn_out = self._drop(self.attn_scale.to(lane0.dtype)[None, None, :] * self.attn(self._norm(self.attn_norm, attn_in)))
        mlp_out = self._drop(self.mlp_scale.to(lane1.dtype)[None, None, :] * self.mlp(self._norm(self.mlp_norm, lane1)))
        resid = self.parallel_resid_lambdas.to(lane0.dtype)
        post = self.parallel_post_lambdas.to(lane0.dtype)
        new0 = resid[0] * lane0 + post[0, 0] * attn_out + post[1, 0] * mlp_out
        new1 = resid[1] * lane1 + post[0, 1] * attn_out + post[1, 1] * mlp_out
        return new0, new1


def layer_ln_scale(layer: int) -> float:
    """The records' layerwise LN scale of block `layer` (0-based): 1/sqrt(layer + 1)."""
    return 1.0 / math.sqrt(layer + 1)
