"""Attention: its config (`model.attention.*`) and grouped-query causal self-attention with
RMS-normed q/k, rotary embeddings and a learned per-head query gain."""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from underpar.config import bounded, choice
from underpar.model.linear import CastedLinear, rms_norm
from underpar.model.rope import ROPE_DTYPES, Rotary, apply_rotary


@dataclasses.dataclass
class AttentionConfig:
    num_heads: int = bounded(8, 1)
    # Fewer key/value heads than query heads: grouped-query attention.
    num_kv_heads: int = bounded(4, 1)
    rope_base: float = bounded(10000.0, 1.0)
    # float32: exact rotary phases. bfloat16: the reference script's rounded phases.
    rope_dtype: str = choice("float32", ROPE_DTYPES)
    qk_gain_init: float = 1.5


class CausalSelfAttention(nn.Module):
    """Grouped-query causal attention with RMS-normed q/k, RoPE and a learned per-head
    query gain (which sets the attention temperature, since q and k have unit RMS)."""

    def __init__(self, dim: int, cfg: AttentionConfig):
        super().__init__()
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
