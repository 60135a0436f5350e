"""The two kinds of export technique and their registries: a quantizer turns a state dict
into a torch-saveable object and back; a compressor turns bytes into fewer bytes and back.
Entries register where they are defined (int8.py, rowquant.py, compress.py); `QuantConfig` names them."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Protocol

from torch import Tensor

from underpar.registry import Registry

if TYPE_CHECKING:
    from underpar.quant.config import QuantConfig


class Quantizer(Protocol):
    """A registered class (or object) with these two static functions."""

    @staticmethod
    def quantize(
        state_dict: Mapping[str, Tensor],
        control_patterns: tuple[str, ...],
        cfg: QuantConfig,
        hessians: Mapping[str, Tensor] | None = None,
    ) -> tuple[dict[str, Any], dict[str, int]]:
        """(object for torch.save, stats); names containing a control pattern stay precise.
        `hessians` (weight name -> input Hessian, from GPTQ calibration) may be ignored."""
        ...

    @staticmethod
    def dequantize(obj: Mapping[str, Any]) -> dict[str, Tensor]:
        """The state dict back, every tensor in its original dtype and shape."""
        ...


class Compressor(Protocol):
    @staticmethod
    def compress(data: bytes) -> bytes: ...

    @staticmethod
    def decompress(blob: bytes) -> bytes: ...


# `quant.scheme` and `quant.compressor` name entries of these.
QUANTIZERS: Registry[Quantizer] = Registry("quantizer")
COMPRESSORS: Registry[Compressor] = Registry("compressor")
