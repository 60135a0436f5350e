"""Per-row clipping for intN quantization (`quant.clip`): where each row's range ends, hence
its scale = clip / qmax. Each rule is a parameter dataclass registered in CLIPS; calling it
on a 2-D fp32 tensor gives one clip value per row. Adding one = a dataclass with
`__call__(w_rows, qmax, embedding)` and a registration; tests/test_registries.py checks it.

  sdclip      clip = k * std(row), the records' SDClip: k = 12.85 for block matrices and 20.0
              for embeddings (2026-04-09 / 04-27 records); a k*sigma clip ignores how heavy
              one outlier is, which a max or high percentile does not.
  percentile  clip = that percentile of |row| (the baseline int8 export's rule, 99.99984).
  mse         search: for each row the k from a grid whose round-trip squared error is least.
"""

from __future__ import annotations

import dataclasses
from typing import Protocol

import torch
from torch import Tensor

from underpar.config import bounded
from underpar.errors import ConfigError
from underpar.registry import Registry


class Clip(Protocol):
    def __call__(self, w_rows: Tensor, qmax: int, embedding: bool) -> Tensor:
        """One clip value (>= 0, fp32) per row of the 2-D fp32 `w_rows`."""
        ...


CLIPS: Registry[type[Clip]] = Registry("clip")

# The smallest positive fp16 (subnormal): scales stored as fp16 never reach 0, so no code
# divides by zero; a row that is all zeros quantizes to zeros.
MIN_SCALE = 2.0**-24


def row_scales(clip: Tensor, qmax: int) -> Tensor:
    """fp16 per-row scales clip / qmax, floored at the smallest positive fp16."""
    return (clip.float() / qmax).clamp_min(MIN_SCALE).to(torch.float16)


def round_to_nearest(w_rows: Tensor, scale: Tensor, qmax: int) -> Tensor:
    """int8 codes in [-qmax, qmax]: round-half-even of w / scale (the stored fp16 scale)."""
    return torch.clamp(torch.round(w_rows.float() / scale.float()[:, None]), -qmax, qmax).to(torch.int8)


def _row_std(w_rows: Tensor) -> Tensor:
    # The unbiased std, as the records compute it; a single column has none: use |w|.
    return w_rows.std(dim=1) if w_rows.shape[1] > 1 else w_rows.abs()[:, 0]


@CLIPS.register("sdclip")
@dataclasses.dataclass
class SDClip:
    """clip = sigmas * std(row); embeddings use their own, wider, multiple."""

    matrix_sigmas: float = bounded(12.85, 0.1)
    embed_sigmas: float = bounded(20.0, 0.1)

    def __call__(self, w_rows: Tensor, qmax: int, embedding: bool) -> Tensor:
        return (self.embed_sigmas if embedding else self.matrix_sigmas) * _row_std(w_rows.float())


@CLIPS.register("percentile")
@dataclasses.dataclass
class Percentile:
    """clip = the `percentile` of |row| (torch.quantile, linear interpolation)."""

    percentile: float = bounded(99.99984, 50.0, 100.0)

    def __call__(self, w_rows: Tensor, qmax: int, embedding: bool) -> Tensor:
        a = w_rows.float().abs()
        q = self.percentile / 100.0
        # torch.quantile refuses inputs over 2**24 values: fall back to one row at a time.
        if a.numel() <= 1 << 24:
            return torch.quantile(a, q, dim=1)
        return torch.stack([torch.quantile(row, q) for row in a])


@CLIPS.register("mse")
@dataclasses.dataclass
class MSESearch:
    """For each row, the clip k * std(row) (k over `steps` values from `min_sigmas` to
    `max_sigmas`, the row's max |w| among the candidates) with the least squared error of
    quantize -> dequantize."""

    min_sigmas: float = bounded(2.0, 0.1)
    max_sigmas: float = bounded(16.0, 0.1)
    steps: int = bounded(15, 1, 256)

    def check(self) -> None:
        if self.min_sigmas > self.max_sigmas:
            raise ConfigError(f"quant.clip.min_sigmas ({self.min_sigmas}) must not exceed "
                              f"quant.clip.max_sigmas ({self.max_sigmas})")

    def __call__(self, w_rows: Tensor, qmax: int, embedding: bool) -> Tensor:
        w = w_rows.float()
        std = _row_std(w)
        candidates = [k * std for k in torch.linspace(self.min_sigmas, self.max_sigmas, self.steps).tolist()]
        candidates.append(w.abs().amax(dim=1))
        best_clip, best_err = candidates[0], None
        for clip in candidates:
            scale = row_scales(clip, qmax)
            err = (round_to_nearest(w, scale, qmax).float() * scale.float()[:, None] - w).square().sum(dim=1)
            if best_err is None:
                best_err = err
                continue
            better = err < best_err
            best_clip = torch.where(better, clip, best_clip)
            best_err = torch.where(better, err, best_err)
        return best_clip
