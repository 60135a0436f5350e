"""The building blocks every part shares: the weightless RMS norm and the fp32-weight linear
that computes in the input's dtype."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from underpar.quant.qat import fake_quantize_rows


def rms_norm(x: Tensor) -> Tensor:
    """RMS norm over the last dim with no learned weight (eps = the dtype's machine eps)."""
    return F.rms_norm(x, (x.size(-1),))


class RMSNorm(nn.Module):
    """Weightless RMS norm as a module, so blocks show where their norms sit."""

    def forward(self, x: Tensor) -> Tensor:
        return rms_norm(x)


class CastedLinear(nn.Linear):
    """A bias-free linear whose weight stays fp32 (optimizer quality) and is cast to the
    input's dtype at matmul time (bf16 compute). With `qat_bits` set (a training stage, see
    quant/qat.py) the weight is fake-quantized per row first; 0, the default, leaves the
    forward exactly the plain one."""

    def __init__(self, in_features: int, out_features: int, zero_init: bool = False):
        super().__init__(in_features, out_features, bias=False)
        # An instance attribute from the start, so switching it never changes how the compiled
        # graph's guard finds it (a class default would make "off" two graphs).
        self.qat_bits = 0
        # Output projections start at zero so every block begins as the identity.
        self.zero_init = zero_init
        if zero_init:
            nn.init.zeros_(self.weight)

    def casted_weight(self, dtype: torch.dtype) -> Tensor:
        """The weight the forward multiplies by: fake-quantized under QAT, cast to `dtype`."""
        w = self.weight
        return (fake_quantize_rows(w, self.qat_bits) if self.qat_bits else w).to(dtype)

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.casted_weight(x.dtype))
