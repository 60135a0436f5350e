"""The two kinds of export technique and their registries: a quantizer turns a state dict
into a torch-saveable object and back; a compressor turns bytes into fewer bytes and back.
Entries register where they are defined (int8.py, compress.py); `QuantConfig` names them."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Protocol

from torch import Tensor

from underpar.registry import Registry


class Quantizer(Protocol):
    """A registered class (or object) with these two static functions."""

    @staticmethod
    def quantize(
        state_dict: Mapping[str, Tensor],
        control_patterns: tuple[str, ...],
        *,
        clip_percentile: float,
        keep_float_max_numel: int,
    ) -> tuple[dict[str, Any], dict[str, int]]:
        """(object for torch.save, stats); names containing a control pattern stay precise."""
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
