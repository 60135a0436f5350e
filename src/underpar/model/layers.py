"""The parts of the baseline GPT: norms, fp32-weight linears, rotary embeddings, GQA
attention, the MLP with its activation table, and the residual block that joins them."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor, nn

if TYPE_CHECKING:
    from underpar.model.gpt import GPTConfig


def rms_norm(x: Tensor) -> Tensor:
    """RMS norm over the last dim with no learned weight (eps = the dtype's machine eps)."""
    return F.rms_norm(x, (x.size(-1),))


class RMSNorm(nn.Module):
    """Weightless RMS norm as a module, so blocks show where their norms sit."""

    def forward(self, x: Tensor) -> Tensor:
        return rms_norm(x)


class CastedLinear(nn.Linear):
    """A bias-free linear whose weight stays fp32 (optimizer quality) and is cast to the
    input's dtype at matmul time (bf16 compute)."""

    def __init__(self, in_features: int, out_features: int, zero_init: bool = False):
        super().__init__(in_features, out_features, bias=False)
        # Output projections start at zero so every block begins as the identity.
        self.zero_init = zero_init
        if zero_init:
            nn.init.zeros_(self.weight)

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.weight.to(x.dtype))


# ---------------------------------------------------------------------------------------
# rotary position embeddings

ROPE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


class Rotary(nn.Module):
    """cos/sin tables for rotating pairs (i, i + head_dim/2) of each head.

    The tables are recomputed every forward from constants (cheap, and under torch.compile
    they fold into the graph), so there is no Python-side cache to guard on. `table_dtype`
    is the precision of positions and phases: float32 is exact; bfloat16 reproduces the
    reference script, whose `model.bfloat16()` also casts its inverse-frequency buffer so
    positions above 256 are rounded.
    """

    def __init__(self, head_dim: int, base: float, table_dtype: torch.dtype = torch.float32):
        super().__init__()
        self.head_dim = head_dim
        self.base = base
        self.table_dtype = table_dtype

    def forward(
        self, seq_len: int, device: torch.device, dtype: torch.dtype
    ) -> tuple[Tensor, Tensor]:
        pair_index = torch.arange(0, self.head_dim, 2, device=device, dtype=torch.float32)
        exponents = pair_index / self.head_dim
        inv_freq = (1.0 / (self.base**exponents)).to(self.table_dtype)
        positions = torch.arange(seq_len, device=device, dtype=self.table_dtype)
        phases_td = torch.outer(positions, inv_freq)
        # [1, 1, T, head_dim/2]: broadcast over batch and heads.
        return phases_td.cos()[None, None].to(dtype), phases_td.sin()[None, None].to(dtype)


def apply_rotary(x_bhtd: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    half = x_bhtd.size(-1) // 2
    x1, x2 = x_bhtd[..., :half], x_bhtd[..., half:]
    return torch.cat((x1 * cos + x2 * sin, x2 * cos - x1 * sin), dim=-1)


# ---------------------------------------------------------------------------------------
# attention


class CausalSelfAttention(nn.Module):
    """Grouped-query causal attention with RMS-normed q/k, RoPE and a learned per-head
    query gain (which sets the attention temperature, since q and k have unit RMS)."""

    def __init__(self, cfg: GPTConfig):
        super().__init__()
        dim = cfg.model_dim
        self.num_heads = cfg.num_heads
        self.num_kv_heads = cfg.num_kv_heads
        self.head_dim = dim // cfg.num_heads
        kv_dim = cfg.num_kv_heads * self.head_dim
        self.c_q = CastedLinear(dim, dim)
        self.c_k = CastedLinear(dim, kv_dim)
        self.c_v = CastedLinear(dim, kv_dim)
        self.proj = CastedLinear(dim, dim, zero_init=True)
        self.q_gain = nn.Parameter(torch.full((cfg.num_heads,), float(cfg.qk_gain_init)))
        self.rotary = Rotary(self.head_dim, cfg.rope_base, ROPE_DTYPES[cfg.rope_dtype])

    def forward(self, x_btd: Tensor) -> Tensor:
        batch, seq_len, dim = x_btd.shape
        # q: [B, heads, T, head_dim]; k, v: [B, kv_heads, T, head_dim]
        q = self.c_q(x_btd).view(batch, seq_len, -1, self.head_dim).transpose(1, 2)
        k = self.c_k(x_btd).view(batch, seq_len, -1, self.head_dim).transpose(1, 2)
        v = self.c_v(x_btd).view(batch, seq_len, -1, self.head_dim).transpose(1, 2)
        q, k = rms_norm(q), rms_norm(k)
        cos, sin = self.rotary(seq_len, x_btd.device, q.dtype)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        q = q * self.q_gain.to(q.dtype)[None, :, None, None]
        y = F.scaled_dot_product_attention(
            q, k, v, is_causal=True, enable_gqa=self.num_kv_heads != self.num_heads
        )
        return self.proj(y.transpose(1, 2).reshape(batch, seq_len, dim))


# ---------------------------------------------------------------------------------------
# MLP


def relu2(x: Tensor) -> Tensor:
    return torch.relu(x).square()


def leaky_relu2(x: Tensor) -> Tensor:
    return F.leaky_relu(x, negative_slope=0.5).square()


# name -> elementwise function applied to the MLP's hidden layer (`model.mlp_activation`).
ACTIVATIONS: dict[str, Callable[[Tensor], Tensor]] = {
    "relu2": relu2,
    "leaky_relu2": leaky_relu2,
    "gelu": F.gelu,
    "silu": F.silu,
    "relu": torch.relu,
}


def mlp_hidden_dim(cfg: GPTConfig) -> int:
    return int(cfg.mlp_mult * cfg.model_dim)


class MLP(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        hidden = mlp_hidden_dim(cfg)
        self.fc = CastedLinear(cfg.model_dim, hidden)
        self.proj = CastedLinear(hidden, cfg.model_dim, zero_init=True)
        self.activation = ACTIVATIONS[cfg.mlp_activation]

    def forward(self, x_btd: Tensor) -> Tensor:
        return self.proj(self.activation(self.fc(x_btd)))


# ---------------------------------------------------------------------------------------
# block


class Block(nn.Module):
    """Pre-norm residual block. Before attention, the stream is re-mixed with the initial
    embedding x0 by learned per-dim weights (`resid_mix`, init: all stream, no x0); each
    branch output is scaled per dim (`attn_scale`, `mlp_scale`, init 1)."""

    def __init__(self, cfg: GPTConfig):
        super().__init__()
        dim = cfg.model_dim
        self.attn_norm = RMSNorm()
        self.mlp_norm = RMSNorm()
        self.attn = CausalSelfAttention(cfg)
        self.mlp = MLP(cfg)
        self.attn_scale = nn.Parameter(torch.ones(dim, dtype=torch.float32))
        self.mlp_scale = nn.Parameter(torch.ones(dim, dtype=torch.float32))
        self.resid_mix = nn.Parameter(torch.stack((torch.ones(dim), torch.zeros(dim))).float())

    def forward(self, x_btd: Tensor, x0_btd: Tensor) -> Tensor:
        mix = self.resid_mix.to(x_btd.dtype)
        x = mix[0][None, None, :] * x_btd + mix[1][None, None, :] * x0_btd
        x = x + self.attn_scale.to(x.dtype)[None, None, :] * self.attn(self.attn_norm(x))
        x = x + self.mlp_scale.to(x.dtype)[None, None, :] * self.mlp(self.mlp_norm(x))
        return x
