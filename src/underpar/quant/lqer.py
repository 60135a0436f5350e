"""LQER: a low-rank correction of the quantization error (`quant.lqer_rank`, `lqer_top_k`,
`lqer_bits`), as the 2026-04 records ship it: for the `top_k` tensors whose error
E = W - dequant(W) has the largest Frobenius norm, the rank-r truncated SVD E ~ A B
(A = U_r S_r [rows, r], B = V_r^T [r, cols]) is stored with per-row intN codes (int4 by
default) and fp16 scales, and added back at load: W_hat = dequant(W) + A_hat B_hat.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor

from underpar.quant.clip import round_to_nearest, row_scales


def _absmax_codes(m: Tensor, bits: int) -> tuple[Tensor, Tensor]:
    qmax = (1 << (bits - 1)) - 1
    scale = row_scales(m.abs().amax(dim=1), qmax)
    return round_to_nearest(m, scale, qmax), scale


def lqer_factors(error: Tensor, rank: int, bits: int) -> dict[str, Tensor | int]:
    """Quantized rank-`rank` factors of the 2-D `error` (a torch.save-able dict)."""
    U, S, Vh = torch.linalg.svd(error.float(), full_matrices=False)
    r = min(rank, S.numel())
    a_codes, a_scale = _absmax_codes(U[:, :r] * S[:r], bits)
    b_codes, b_scale = _absmax_codes(Vh[:r], bits)
    return {"bits": bits, "a": a_codes, "a_scale": a_scale, "b": b_codes, "b_scale": b_scale}


def lqer_delta(factors: Mapping[str, Tensor | int]) -> Tensor:
    """A_hat @ B_hat, fp32 [rows, cols]."""
    a = factors["a"].float() * factors["a_scale"].float()[:, None]
    b = factors["b"].float() * factors["b_scale"].float()[:, None]
    return a @ b


def worst(errors: Mapping[str, float], top_k: int) -> list[str]:
    """The `top_k` names with the largest error norms (ties by name, so the pick is deterministic)."""
    return [name for name, _ in sorted(errors.items(), key=lambda kv: (-kv[1], kv[0]))[:top_k]]
