"""QAT (`quant.qat_bits`, `quant.qat_start`): straight-through fake quantization of linear
weights per output row, switched on late in training as a training stage.

Forward: each row of W is replaced by its symmetric intN round trip on the row's abs-max
scale (fp16, as stored); backward: the gradient passes through unchanged (the straight-
through estimator), so training learns weights that survive rounding. CastedLinear reads its
`qat_bits` (0 = off, the default: then its forward is exactly the plain one); the switch
flips that Python attribute, which the compiled graph is specialised on, so each stage has
its own graph, compiled in the untimed warmup.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from underpar.quant.clip import round_to_nearest, row_scales

if TYPE_CHECKING:
    from underpar.quant.config import QuantConfig


def quantize_dequantize_rows(w: Tensor, bits: int) -> Tensor:
    """The fp32 round trip of 2-D `w` through per-row int`bits` codes on abs-max fp16 scales."""
    qmax = (1 << (bits - 1)) - 1
    w32 = w.float()
    scale = row_scales(w32.abs().amax(dim=1), qmax)
    return round_to_nearest(w32, scale, qmax).float() * scale.float()[:, None]


def fake_quantize_rows(w: Tensor, bits: int) -> Tensor:
    """Forward: `quantize_dequantize_rows(w, bits)` in w's dtype; backward: identity (STE)."""
    with torch.no_grad():
        q = quantize_dequantize_rows(w, bits).to(w.dtype)
    return w + (q - w).detach()


def qat_modules(model: nn.Module, cfg: QuantConfig) -> list[nn.Module]:
    """The linears QAT applies to: those with a `qat_bits` switch whose weight the export
    quantizes (more than quant.keep_float_max_numel values)."""
    return [m for m in model.modules() if hasattr(m, "qat_bits") and m.weight.numel() > cfg.keep_float_max_numel]


def set_qat(model: nn.Module, cfg: QuantConfig, on: bool) -> None:
    for module in qat_modules(model, cfg):
        module.qat_bits = cfg.qat_bits if on else 0


def qat_switches(model: nn.Module, cfg: QuantConfig) -> list[tuple[float, str, Callable[[bool], None]]]:
    """The training stage that turns QAT on at `quant.qat_start`, as (at, name, set) - the
    fields of underpar.stages.Switch, in order; none when quant.qat_bits = 0."""
    if cfg.qat_bits == 0 or not qat_modules(model, cfg):
        return []
    return [(cfg.qat_start, f"qat int{cfg.qat_bits}", lambda on: set_qat(model, cfg, on))]
