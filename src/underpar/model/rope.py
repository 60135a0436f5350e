"""Rotary position embeddings: the cos/sin tables and the rotation of query/key pairs, on all
of a head's dims or only its first `rotary_dims` (partial RoPE), with optional scaling for
contexts longer than training (model/rope_scaling.py)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from underpar.model.rope_scaling import NoScaling

# `model.attention.rope_dtype` name -> the precision of positions and phases.
ROPE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


class Rotary(nn.Module):
    """cos/sin tables for rotating pairs (i, i + rotary_dims/2) of each head's first
    `rotary_dims` dims (0: all `head_dim`); the other dims carry no position.

    The frequencies span the rotated dims, base^(-2i/rotary_dims), as in the leaderboard's
    partial RoPE (16 of 64): the rotated dims keep the full range of wavelengths. The tables
    are recomputed every forward from constants (cheap, and under torch.compile they fold into
    the graph), so there is no Python-side cache to guard on. `table_dtype` is the precision
    of positions and phases: float32 is exact; bfloat16 reproduces the reference script, whose
    `model.bfloat16()` also casts its inverse-frequency buffer so positions above 256 are
    rounded. `scaling` (a model/rope_scaling.py entry) may change the frequencies at a
    sequence length and asks for a factor on the attention logits (`logit_scale`).
    """

    def __init__(
        self,
        head_dim: int,
        base: float,
        table_dtype: torch.dtype = torch.float32,
        rotary_dims: int = 0,
        scaling: object | None = None,
    ):
        super().__init__()
        self.head_dim = head_dim
        self.rotary_dims = rotary_dims or head_dim
        self.base = base
        self.table_dtype = table_dtype
        self.scaling = NoScaling() if scaling is None else scaling

    def forward(
        self, seq_len: int, device: torch.device, dtype: torch.dtype
    ) -> tuple[Tensor, Tensor]:
        inv_freq = self.scaling.inv_freq(self.base, self.rotary_dims, seq_len, device).to(self.table_dtype)
        positions = torch.arange(seq_len, device=device, dtype=self.table_dtype)
        phases_td = torch.outer(positions, inv_freq)
        # [1, 1, T, rotary_dims/2]: broadcast over batch and heads.
        return phases_td.cos()[None, None].to(dtype), phases_td.sin()[None, None].to(dtype)

    def logit_scale(self, seq_len: int) -> float:
        """The factor on attention logits at this length (YaRN's temperature; else 1)."""
        return self.scaling.logit_scale(seq_len)


def apply_rotary(x_bhtd: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate each pair (i, i + r/2) of the first r = 2 * cos.size(-1) dims of the last dim by
    the tables' phases; dims from r on pass through unchanged."""
    half = cos.size(-1)
    if 2 * half == x_bhtd.size(-1):
        x1, x2 = x_bhtd[..., :half], x_bhtd[..., half:]
        return torch.cat((x1 * cos + x2 * sin, x2 * cos - x1 * sin), dim=-1)
    x1, x2, rest = x_bhtd[..., :half], x_bhtd[..., half : 2 * half], x_bhtd[..., 2 * half :]
    return torch.cat((x1 * cos + x2 * sin, x2 * cos - x1 * sin, rest), dim=-1)
