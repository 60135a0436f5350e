"""Compressors for the artifact's bytes (`quant.compressor`, `quant.compressors`). Adding one =
one registered class with `compress` and `decompress` here.

zlib-9 is the baseline's; lzma-9 extreme, brotli-11 and zstd-22 are what the records try.
brotli and zstd come from the `brotli` and `zstandard` packages (project dependencies); on a
machine without one, that entry says so when used and the export's best-of skips it.
"""

from __future__ import annotations

import importlib
import lzma
import zlib
from types import ModuleType

from underpar.errors import ArtifactError
from underpar.quant.base import COMPRESSORS


def _module(name: str, package: str) -> ModuleType:
    try:
        return importlib.import_module(name)
    except ImportError:
        raise ArtifactError(f"compressor needs the {package!r} package, which is not installed; "
                            f"install it (pip install {package}) or choose another quant.compressor") from None


def available(name: str) -> bool:
    """Whether compressor `name` can run here (its package is installed)."""
    try:
        COMPRESSORS[name].compress(b"")
    except ArtifactError:
        return False
    return True


@COMPRESSORS.register("zlib")
class Zlib:
    """zlib at level 9, as the baseline."""

    @staticmethod
    def compress(data: bytes) -> bytes:
        return zlib.compress(data, 9)

    @staticmethod
    def decompress(blob: bytes) -> bytes:
        return zlib.decompress(blob)


@COMPRESSORS.register("lzma")
class Lzma:
    """xz container, preset 9 | extreme (the header's check guards the payload)."""

    @staticmethod
    def compress(data: bytes) -> bytes:
        return lzma.compress(data, preset=9 | lzma.PRESET_EXTREME)

    @staticmethod
    def decompress(blob: bytes) -> bytes:
        return lzma.decompress(blob)


@COMPRESSORS.register("brotli")
class Brotli:
    """brotli at quality 11 with the largest window (24 bits), as the records."""

    @staticmethod
    def compress(data: bytes) -> bytes:
        return _module("brotli", "brotli").compress(data, quality=11, lgwin=24)

    @staticmethod
    def decompress(blob: bytes) -> bytes:
        return _module("brotli", "brotli").decompress(blob)


@COMPRESSORS.register("zstd")
class Zstd:
    """zstandard at level 22 (ultra), content size recorded in the frame."""

    @staticmethod
    def compress(data: bytes) -> bytes:
        return _module("zstandard", "zstandard").ZstdCompressor(level=22).compress(data)

    @staticmethod
    def decompress(blob: bytes) -> bytes:
        zstd = _module("zstandard", "zstandard")
        # An empty input makes a frame without a content size; max_output_size covers it.
        return zstd.ZstdDecompressor().decompress(blob, max_output_size=1 << 31)
