"""Rotary position embeddings: the cos/sin tables and the rotation of query/key pairs."""

from __future__ import annotations

import torch
from torch import Tensor, nn

# `model.attention.rope_dtype` name -> the precision of positions and phases.
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
    """Rotate each pair (i, i + head_dim/2) of the last dim by the tables' phases."""
    half = x_bhtd.size(-1) // 2
    x1, x2 = x_bhtd[..., :half], x_bhtd[..., half:]
    return torch.cat((x1 * cos + x2 * sin, x2 * cos - x1 * sin), dim=-1)
