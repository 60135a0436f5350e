"""RoPE scaling for evaluating at a longer context than training (`model.attention.rope_scaling`):
none, NTK-aware (a larger base) or YaRN (per-frequency interpolation plus a logit temperature).

Each entry is a parameter dataclass; the `Rotary` module asks it for the inverse frequencies
at a sequence length and for the factor on the attention logits. With `factor = 0` (the
default) the factor follows the length, s = max(1, seq_len / train_seq_len), as PR #38 and
the leaderboard records do: at the training length nothing changes, so switching scaling on
leaves training untouched and only longer evaluation windows are scaled. A fixed `factor >= 1`
applies at every length (Hugging Face's static scaling).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Protocol

import torch
from torch import Tensor

from underpar.config import bounded
from underpar.errors import ConfigError
from underpar.registry import Registry

ROPE_SCALINGS: Registry[type] = Registry("rope_scaling")


class RopeScaling(Protocol):
    def inv_freq(self, base: float, dims: int, seq_len: int, device: torch.device | None = None) -> Tensor:
        """float32 inverse frequencies [dims/2] to use at `seq_len`."""
        ...

    def logit_scale(self, seq_len: int) -> float:
        """The factor on the attention logits at `seq_len` (1: none)."""
        ...


def rope_inv_freq(base: float, dims: int, device: torch.device | None = None) -> Tensor:
    """Plain RoPE inverse frequencies base^(-2i/dims), i < dims/2, in float32 (the
    reference script's arithmetic: a float32 pow of the base)."""
    exponents = torch.arange(0, dims, 2, device=device, dtype=torch.float32) / dims
    return 1.0 / (base**exponents)


def ntk_base(base: float, dims: int, factor: float) -> float:
    """NTK-aware scaling's new base: base * s^(d / (d - 2)), d = the rotated dims. It keeps
    the highest frequency (i = 0) and divides the lowest (i = d/2 - 1) by exactly s."""
    return base * factor ** (dims / (dims - 2))


def yarn_ramp(inv_freq: Tensor, train_seq_len: int, alpha: float, beta: float) -> Tensor:
    """YaRN's gamma per frequency (Peng et al. 2023, "NTK-by-parts"): r = L / wavelength =
    L * theta / (2 pi) rotations over the training context L; gamma = 0 when r < alpha
    (interpolate fully), 1 when r > beta (keep), linear in r between."""
    rotations = train_seq_len * inv_freq / (2 * math.pi)
    return ((rotations - alpha) / (beta - alpha)).clamp(0.0, 1.0)


def yarn_inv_freq(inv_freq: Tensor, factor: float, train_seq_len: int, alpha: float, beta: float) -> Tensor:
    """theta' = (1 - gamma) * theta / s + gamma * theta."""
    gamma = yarn_ramp(inv_freq, train_seq_len, alpha, beta)
    return (1.0 - gamma) * inv_freq / factor + gamma * inv_freq


def yarn_logit_scale(factor: float) -> float:
    """YaRN's temperature: sqrt(1/t) = 0.1 ln(s) + 1 scales both q and k, so the logits are
    multiplied by (0.1 ln(s) + 1)^2."""
    return (0.1 * math.log(factor) + 1.0) ** 2


@dataclasses.dataclass
class _Scaled:
    # 0: follow the length, s = max(1, seq_len / train_seq_len); else a fixed s >= 1.
    factor: float = bounded(0.0, 0.0)
    # The context the model was trained at (set it to train.seq_len).
    train_seq_len: int = bounded(1024, 1)

    def check(self) -> None:
        if 0.0 < self.factor < 1.0:
            raise ConfigError(
                f"rope_scaling.factor = {self.factor} must be 0 (follow the length) or at least 1"
            )

    def factor_at(self, seq_len: int) -> float:
        if self.factor > 0:
            return self.factor
        return max(1.0, seq_len / self.train_seq_len)


@ROPE_SCALINGS.register("none")
@dataclasses.dataclass
class NoScaling:
    """Plain RoPE at every length."""

    def inv_freq(self, base: float, dims: int, seq_len: int, device: torch.device | None = None) -> Tensor:
        return rope_inv_freq(base, dims, device)

    def logit_scale(self, seq_len: int) -> float:
        return 1.0


@ROPE_SCALINGS.register("ntk")
@dataclasses.dataclass
class NTKScaling(_Scaled):
    """NTK-aware: plain RoPE with the base raised to base * s^(d/(d-2)) (PR #38's eval at 2048
    after training at 1024; the records' "YaRN" switch is this formula too)."""

    def inv_freq(self, base: float, dims: int, seq_len: int, device: torch.device | None = None) -> Tensor:
        factor = self.factor_at(seq_len)
        if factor == 1.0:
            return rope_inv_freq(base, dims, device)
        return rope_inv_freq(ntk_base(base, dims, factor), dims, device)

    def logit_scale(self, seq_len: int) -> float:
        return 1.0


@ROPE_SCALINGS.register("yarn")
@dataclasses.dataclass
class YaRNScaling(_Scaled):
    """YaRN (arXiv 2309.00071): frequencies ramped by wavelength between interpolation (theta/s,
    long wavelengths) and extrapolation (theta, short ones), and the logit temperature
    (0.1 ln(s) + 1)^2. alpha = 1, beta = 32 are the paper's values for LLaMA."""

    alpha: float = bounded(1.0, 0.0)
    beta: float = bounded(32.0, 0.0)

    def check(self) -> None:
        super().check()
        if self.alpha >= self.beta:
            raise ConfigError(f"rope_scaling.alpha = {self.alpha} must be below rope_scaling.beta = {self.beta}")

    def inv_freq(self, base: float, dims: int, seq_len: int, device: torch.device | None = None) -> Tensor:
        plain = rope_inv_freq(base, dims, device)
        factor = self.factor_at(seq_len)
        if factor == 1.0:
            return plain
        return yarn_inv_freq(plain, factor, self.train_seq_len, self.alpha, self.beta)

    def logit_scale(self, seq_len: int) -> float:
        return yarn_logit_scale(self.factor_at(seq_len))
