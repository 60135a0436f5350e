"""Compressors for the artifact's bytes (`quant.compressor`). Adding one = one registered
class with `compress` and `decompress` here."""

from __future__ import annotations

import zlib

from underpar.quant.base import COMPRESSORS


@COMPRESSORS.register("zlib")
class Zlib:
    """zlib at level 9, as the baseline."""

    @staticmethod
    def compress(data: bytes) -> bytes:
        return zlib.compress(data, 9)

    @staticmethod
    def decompress(blob: bytes) -> bytes:
        return zlib.decompress(blob)
