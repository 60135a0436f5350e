"""GPTQ calibration that is legal by construction, and the model-level GPTQ export.

The challenge allows calibration on training tokens or on text the model generates itself,
never on validation tokens. A `Calibration` can only be built by the constructors below:
from training shards (a loader over validation shards is refused), from a token tensor
declared as the train split (the val split, or the prepared data's own val tensor, is
refused), or from the model's own samples. `gptq_quantize` accepts nothing else.

The trainer stops `quant.gptq_reserve_seconds` before its budget (`QuantConfig.reserve_seconds`)
and then calls `gptq_quantize(model, Calibration..., cfg)`; its seconds are in the stats.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from underpar.errors import ArtifactError
from underpar.quant.gptq import collect_hessians
from underpar.quant.rowquant import quantize_mixed

if TYPE_CHECKING:
    from underpar.data.dataset import PreparedData
    from underpar.data.shards import TokenLoader
    from underpar.quant.config import QuantConfig

_KEY = object()  # only this module's constructors hold it
# A shard whose name has "val" as a word (val_000000.bin, fineweb_val_000000.bin) is validation data.
_VAL_NAME = re.compile(r"(^|[_\-.])val(idation)?([_\-.]|$)")


class Calibration:
    """Batches of input ids [batch, seq_len] (int64) for GPTQ Hessians, and where they came from
    ("train" or "generated")."""

    def __init__(self, batches: Sequence[Tensor], source: str, key: object = None):
        if key is not _KEY:
            raise ArtifactError("build a Calibration with Calibration.from_loader, from_tokens or generated "
                                "(calibration must provably come from training data or the model's own text)")
        self.batches = list(batches)
        self.source = source

    def __iter__(self) -> Iterator[Tensor]:
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)

    @property
    def num_tokens(self) -> int:
        return sum(b.numel() for b in self.batches)

    @classmethod
    def from_loader(cls, loader: TokenLoader, num_batches: int, tokens_per_batch: int, seq_len: int,
                    data: PreparedData | None = None) -> Calibration:
        """The next `num_batches` batches of a loader over training shards; a loader over any
        validation shard (by name, or by the prepared data's val split) is refused."""
        val = set()
        if data is not None:
            from underpar.data.manifest import split_files

            val = {Path(p).resolve() for p in split_files(data.manifest, "val")}
        for f in loader.files:
            if Path(f).resolve() in val or _VAL_NAME.search(Path(f).name):
                raise ArtifactError(f"calibration refuses {f}: it is validation data; GPTQ may calibrate on "
                                    "training tokens or model-generated text only")
        return cls([loader.next_batch(tokens_per_batch, seq_len)[0] for _ in range(num_batches)], "train", _KEY)

    @classmethod
    def from_tokens(cls, tokens: Tensor, split: str, num_batches: int, batch_size: int, seq_len: int,
                    data: PreparedData | None = None) -> Calibration:
        """Consecutive windows of a 1-D token tensor of the train split."""
        if split != "train":
            raise ArtifactError(f"calibration refuses tokens of the {split!r} split; GPTQ may calibrate on "
                                "training tokens or model-generated text only")
        if data is not None and "val_tokens" in vars(data) and _same_storage(tokens, data.val_tokens):
            raise ArtifactError("calibration refuses the prepared data's validation tokens (declared as 'train')")
        need = num_batches * batch_size * seq_len
        if tokens.ndim != 1 or tokens.numel() < need:
            raise ArtifactError(f"calibration needs a 1-D tensor of at least {need:,} tokens, got shape {tuple(tokens.shape)}")
        windows = tokens[:need].long().view(num_batches, batch_size, seq_len)
        return cls(list(windows), "train", _KEY)

    @classmethod
    @torch.no_grad()
    def generated(cls, model: nn.Module, num_batches: int, batch_size: int, seq_len: int, *, seed: int = 0,
                  temperature: float = 0.8, bos_id: int = 1) -> Calibration:
        """Text the model samples itself from BOS (temperature sampling, seeded)."""
        device = next(model.parameters()).device
        g = torch.Generator(device=device).manual_seed(seed)
        was_training = model.training
        model.eval()
        batches = []
        try:
            for _ in range(num_batches):
                ids = torch.full((batch_size, 1), bos_id, dtype=torch.long, device=device)
                while ids.shape[1] < seq_len:
                    logits = model(ids)[:, -1].float() / max(temperature, 1e-6)
                    nxt = torch.multinomial(torch.softmax(logits, dim=-1), 1, generator=g)
                    ids = torch.cat([ids, nxt], dim=1)
                batches.append(ids.cpu())
        finally:
            model.train(was_training)
        return cls(batches, "generated", _KEY)


def _same_storage(a: Tensor, b: Tensor) -> bool:
    return a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr() or (
        a.shape == b.shape and a.dtype == b.dtype and torch.equal(a, b))


def gptq_quantize(model: nn.Module, calibration: Calibration, cfg: QuantConfig,
                  control_patterns: tuple[str, ...] | None = None) -> tuple[dict[str, Any], dict[str, Any]]:
    """(quantized object for `artifact.export_quantized`, stats): the mixed scheme with GPTQ
    codes for every CastedLinear and the output embedding, Hessians from `calibration`."""
    if not isinstance(calibration, Calibration):
        raise ArtifactError(f"gptq_quantize needs a Calibration (training tokens or generated text), "
                            f"got {type(calibration).__name__}")
    if control_patterns is None:
        from underpar.model.precision import CONTROL_PATTERNS

        control_patterns = CONTROL_PATTERNS
    start = time.perf_counter()
    device = next(model.parameters()).device
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else torch.autocast("cpu", enabled=False)
    with autocast:
        hessians = collect_hessians(model, (b.to(device) for b in calibration))
    calibrated = time.perf_counter()
    hessians = {name: h.to(device) for name, h in hessians.items()}
    obj, stats = quantize_mixed(model.state_dict(), control_patterns, cfg, hessians)
    done = time.perf_counter()
    seconds = done - start
    return obj, {**stats, "calibration_source": calibration.source, "calibration_tokens": calibration.num_tokens,
                 "calibration_seconds": round(calibrated - start, 3), "gptq_seconds": round(seconds, 3),
                 "within_reserve": seconds <= cfg.gptq_reserve_seconds}
