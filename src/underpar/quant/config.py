"""How the trained model becomes artifact bytes (`quant.*`). The defaults are the baseline's
export (per-row int8, torch.save + zlib-9); the records' stack is options next to them:
the "mixed" scheme (int6 matrices, int8/int7 embeddings, SDClip), GPTQ, LQER, the grouped
container (packing, byte-plane shuffling, best compressor per group) and QAT."""

from __future__ import annotations

import dataclasses

from underpar.config import bounded, choice, items, variant
from underpar.errors import ConfigError
from underpar.quant import compress  # noqa: F401  (registers the built-in compressors)
from underpar.quant import rowquant  # noqa: F401  (registers the mixed scheme)
from underpar.quant.base import COMPRESSORS, QUANTIZERS
from underpar.quant.clip import CLIPS, Clip
from underpar.quant.int8 import CLIP_PERCENTILE, KEEP_FLOAT_MAX_NUMEL  # and registers int8
from underpar.quant.pack import LAYOUTS
from underpar.quant.qat import QAT_CLIPS, qat_grid

CONTAINERS = ("torch", "grouped")


def _choices(default: list[str], valid) -> list[str]:
    """A list field each of whose values must be one of `valid`."""
    return dataclasses.field(default_factory=lambda: list(default), metadata={"choices": valid})


@dataclasses.dataclass
class QuantConfig:
    """How the trained model becomes artifact bytes."""

    scheme: str = choice("int8", QUANTIZERS)
    clip_percentile: float = bounded(CLIP_PERCENTILE, 50.0, 100.0)  # the int8 scheme's clip
    keep_float_max_numel: int = bounded(KEEP_FLOAT_MAX_NUMEL, 0)
    # "torch": torch.save of the quantized object, one `compressor` over it (the baseline).
    # "grouped": a versioned, checksummed container whose tensor groups are each stored in the
    # smallest of `packings` x `compressors` (quant/container.py).
    container: str = choice("torch", CONTAINERS)
    compressor: str = choice("zlib", COMPRESSORS)
    compressors: list[str] = _choices(["zlib", "lzma", "brotli", "zstd"], COMPRESSORS)
    packings: list[str] = _choices(["int8", "bits"], LAYOUTS)

    # scheme "mixed": per-row intN codes (2..8 bits); names containing an embed pattern are
    # embeddings. The records: int6 matrices, int8 (earlier) or int7 embeddings.
    matrix_bits: int = bounded(6, 2, 8)
    embed_bits: int = bounded(8, 2, 8)
    embed_patterns: list[str] = items(["tok_emb", "lm_head"])
    clip: Clip = variant(CLIPS, "sdclip")

    # GPTQ (scheme "mixed"): Hessians from `gptq_calibration_batches` batches of training or
    # self-generated tokens. The trainer stops training `gptq_reserve_seconds` early so that
    # calibration and quantization fit inside the training budget (12 s in the 2026-04-09
    # record, 4 s in 2026-04-27's).
    gptq: bool = False
    gptq_calibration_batches: int = bounded(16, 1)
    gptq_reserve_seconds: float = bounded(12.0, 0.0)
    gptq_block_size: int = bounded(128, 1)
    gptq_damp: float = bounded(0.01, 0.0, 1.0)
    gptq_act_order: bool = True

    # LQER (scheme "mixed"): rank-r corrections of the `lqer_top_k` worst tensors, stored as
    # `lqer_bits` codes; rank 0 = off (the records: rank 4, top 3, int4).
    lqer_rank: int = bounded(0, 0, 64)
    lqer_top_k: int = bounded(3, 1)
    lqer_bits: int = bounded(4, 2, 8)

    # QAT: straight-through fake quantization of every CastedLinear weight per output row at
    # `qat_bits` (0 = off) from `qat_start` (fraction of training) on (quant/qat.py).
    qat_bits: int = bounded(0, 0, 8)
    qat_start: float = bounded(0.85, 0.0, 1.0)
    # The fake quantizer's per-row clip: "absmax" (the int8 export's grid) or "sdclip" (the
    # mixed export's grid: quant.clip's matrix_sigmas * std(row); needs quant.clip = sdclip).
    qat_clip: str = choice("absmax", QAT_CLIPS)

    def check(self) -> None:
        if self.scheme != "mixed":
            for field, on in (("container", self.container != "torch"), ("gptq", self.gptq),
                              ("lqer_rank", self.lqer_rank > 0)):
                if on:
                    raise ConfigError(f"quant.{field} = {getattr(self, field)!r} needs quant.scheme = 'mixed' "
                                      f"(it is {self.scheme!r}); set --set quant.scheme=mixed")
        qat_grid(self)  # quant.qat_clip = sdclip needs quant.clip = sdclip
        if self.qat_bits == 1:
            raise ConfigError("quant.qat_bits = 1 is not valid; use 0 (off) or 2..8")
        if self.container == "grouped" and not (self.compressors and self.packings):
            raise ConfigError("quant.compressors and quant.packings each need at least one entry "
                              f"(compressors: {', '.join(COMPRESSORS)}; packings: {', '.join(LAYOUTS)})")

    def reserve_seconds(self) -> float:
        """Training seconds to leave for GPTQ calibration + quantization (0 without GPTQ)."""
        return self.gptq_reserve_seconds if self.gptq else 0.0
