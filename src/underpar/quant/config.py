"""How the trained model becomes artifact bytes (`quant.*`): which quantizer, its clipping and
keep-float threshold, and which compressor."""

from __future__ import annotations

import dataclasses

from underpar.config import bounded, choice
from underpar.quant import compress  # noqa: F401  (registers the built-in compressors)
from underpar.quant.base import COMPRESSORS, QUANTIZERS
from underpar.quant.int8 import CLIP_PERCENTILE, KEEP_FLOAT_MAX_NUMEL  # and registers int8


@dataclasses.dataclass
class QuantConfig:
    """How the trained model becomes artifact bytes."""

    scheme: str = choice("int8", QUANTIZERS)
    clip_percentile: float = bounded(CLIP_PERCENTILE, 50.0, 100.0)
    keep_float_max_numel: int = bounded(KEEP_FLOAT_MAX_NUMEL, 0)
    compressor: str = choice("zlib", COMPRESSORS)
