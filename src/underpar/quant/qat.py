"""QAT (`quant.qat_bits`, `quant.qat_start`): straight-through fake quantization of linear
weights per output row, switched on late in training as a training stage.

Forward: each row of W is replaced by its symmetric intN round trip on an fp16 per-row
scale (as stored); backward: the gradient passes through unchanged (the straight-through
estimator), so training learns weights that survive rounding. The scale (`quant.qat_clip`):
  absmax  clip = max |row| (the int8 export's grid: its 99.99984th percentile is ~ the max)
  sdclip  clip = quant.clip.matrix_sigmas * std(row): exactly the grid the mixed export's
          SDClip rounds block matrices to (int6 at k = 12.85 has a step of 0.41 std, four
          times the abs-max grid's), so QAT trains for the grid the artifact uses.
CastedLinear reads its `qat_bits` (0 = off, the default: then its forward is exactly the plain
one; an int = abs-max; a tuple (bits, sigmas) = SDClip) and passes it here; the switch flips
that Python attribute, which the compiled graph is specialised on, so each stage has its own
graph, compiled in the untimed warmup.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from underpar.errors import ConfigError
from underpar.quant.clip import _row_std, round_to_nearest, row_scales

if TYPE_CHECKING:
    from underpar.quant.config import QuantConfig


QAT_CLIPS = ("absmax", "sdclip")


def quantize_dequantize_rows(w: Tensor, bits: int, sigmas: float = 0.0) -> Tensor:
    """The fp32 round trip of 2-D `w` through per-row int`bits` codes on fp16 scales: abs-max
    clips, or `sigmas` * std(row) when `sigmas` > 0 (the SDClip export's rule)."""
    qmax = (1 << (bits - 1)) - 1
    w32 = w.float()
    clip = sigmas * _row_std(w32) if sigmas > 0 else w32.abs().amax(dim=1)
    scale = row_scales(clip, qmax)
    return round_to_nearest(w32, scale, qmax).float() * scale.float()[:, None]


def fake_quantize_rows(w: Tensor, grid: int | tuple[int, float]) -> Tensor:
    """Forward: the round trip on `grid` (bits, abs-max; or (bits, sigmas), SDClip) in w's
    dtype; backward: identity (STE)."""
    bits, sigmas = (grid, 0.0) if isinstance(grid, int) else grid
    with torch.no_grad():
        q = quantize_dequantize_rows(w, bits, sigmas).to(w.dtype)
    return w + (q - w).detach()


def qat_grid(cfg: QuantConfig) -> int | tuple[int, float]:
    """What set_qat stores in each linear's `qat_bits`: the bits (abs-max) or (bits, sigmas)."""
    if cfg.qat_clip == "absmax":
        return cfg.qat_bits
    sigmas = getattr(cfg.clip, "matrix_sigmas", None)
    if sigmas is None:
        raise ConfigError(f"quant.qat_clip = 'sdclip' takes its k from quant.clip = sdclip "
                          f"(it is {type(cfg.clip).__name__}); set --set quant.clip.name=sdclip")
    return (cfg.qat_bits, float(sigmas))


def qat_modules(model: nn.Module, cfg: QuantConfig) -> list[nn.Module]:
    """The linears QAT applies to: those with a `qat_bits` switch whose weight the export
    quantizes (more than quant.keep_float_max_numel values)."""
    return [m for m in model.modules() if hasattr(m, "qat_bits") and m.weight.numel() > cfg.keep_float_max_numel]


def set_qat(model: nn.Module, cfg: QuantConfig, on: bool) -> None:
    for module in qat_modules(model, cfg):
        module.qat_bits = qat_grid(cfg) if on else 0


def qat_switches(model: nn.Module, cfg: QuantConfig) -> list[tuple[float, str, Callable[[bool], None]]]:
    """The training stage that turns QAT on at `quant.qat_start`, as (at, name, set) - the
    fields of underpar.stages.Switch, in order; none when quant.qat_bits = 0."""
    if cfg.qat_bits == 0 or not qat_modules(model, cfg):
        return []
    grid = "" if cfg.qat_clip == "absmax" else f" sdclip {qat_grid(cfg)[1]:g}"
    return [(cfg.qat_start, f"qat int{cfg.qat_bits}{grid}", lambda on: set_qat(model, cfg, on))]
