"""The artifact: write and read the compressed quantized model, and count its bytes against the
parameter-golf limit (code bytes + compressed model bytes <= 16,000,000)."""

from __future__ import annotations

import dataclasses
import io
import os
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from torch import Tensor

import underpar
from underpar.errors import ArtifactError
from underpar.quant.base import COMPRESSORS, QUANTIZERS
from underpar.quant.config import QuantConfig

LIMIT_BYTES = 16_000_000

# The source that defines the model and its training, relative to the package folder: what a
# submission's single train_gpt.py would have to contain, so what the code bytes count.
CODE_GLOBS = (
    "model/*.py",
    "optim/**/*.py",
    "quant/**/*.py",
    "data/shards.py",
    "data/byte_count.py",
    "eval/bpb.py",
    "runs/clock.py",
    "tracks/pretrain.py",
    "config.py",
    "registry.py",
    "errors.py",
)
# The Hugging Face modules under model/ that only fine-tuning and RandOpt use.
NOT_COUNTED = ("model/hf.py", "model/smollm2.py", "model/surgery.py")


def export_model(
    state_dict: Mapping[str, Tensor],
    cfg: QuantConfig,
    path: str | os.PathLike[str],
    control_patterns: tuple[str, ...],
) -> int:
    """Quantize, torch.save, compress and write `state_dict` to `path`; the compressed byte
    count. The file appears complete or not at all."""
    obj, _stats = QUANTIZERS[cfg.scheme].quantize(
        state_dict,
        control_patterns,
        clip_percentile=cfg.clip_percentile,
        keep_float_max_numel=cfg.keep_float_max_numel,
    )
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    blob = COMPRESSORS[cfg.compressor].compress(buffer.getvalue())

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # A temporary name in the same folder makes os.replace an atomic rename.
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(blob)
        os.replace(tmp_name, path)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise
    return len(blob)


def load_model(path: str | os.PathLike[str], cfg: QuantConfig) -> dict[str, Tensor]:
    """The state dict from an artifact written by `export_model` with the same `cfg`."""
    path = Path(path)
    try:
        blob = path.read_bytes()
    except FileNotFoundError:
        raise ArtifactError(f"artifact {path} does not exist; export the model first") from None
    try:
        raw = COMPRESSORS[cfg.compressor].decompress(blob)
    except Exception as e:
        raise ArtifactError(
            f"artifact {path} ({len(blob):,} bytes) is truncated or corrupt: it does not decompress with "
            f"quant.compressor={cfg.compressor!r} ({e}); export the model again"
        ) from None
    try:
        # The object is dicts of tensors and strings only, so the safe loader suffices.
        obj = torch.load(io.BytesIO(raw), map_location="cpu", weights_only=True)
    except Exception as e:
        raise ArtifactError(f"artifact {path} is corrupt: it decompresses but holds no saved model ({e})") from None
    return QUANTIZERS[cfg.scheme].dequantize(obj)


# ---------------------------------------------------------------------------------------
# byte accounting


def code_files(globs: Sequence[str] = CODE_GLOBS) -> list[Path]:
    """The counted source files of the installed package that exist, sorted."""
    root = Path(underpar.__file__).parent
    found = {p for pattern in globs for p in root.glob(pattern) if p.is_file()}
    return sorted(found - {root / name for name in NOT_COUNTED})


def code_bytes(files: Sequence[Path]) -> int:
    return sum(Path(f).stat().st_size for f in files)


@dataclasses.dataclass(frozen=True)
class ArtifactBytes:
    code: int
    model: int
    total: int
    limit: int
    files: tuple[Path, ...]

    def as_dict(self) -> dict:
        """For summaries: the byte counts and the counted files, relative to the package."""
        root = Path(underpar.__file__).parent
        return {"code": self.code, "model": self.model, "total": self.total, "limit": self.limit,
                "code_files": [str(p.relative_to(root)) for p in self.files]}


def account(model_bytes: int, limit: int = LIMIT_BYTES) -> ArtifactBytes:
    """Code + model bytes; raises ArtifactError when the total is over `limit`."""
    files = tuple(code_files())
    code = code_bytes(files)
    total = code + model_bytes
    if total > limit:
        raise ArtifactError(
            f"artifact is {total:,} bytes (code {code:,} + model {model_bytes:,}), over the "
            f"limit {limit:,} by {total - limit:,} bytes; shrink the model (fewer layers or "
            "less width) or quantize harder (quant.scheme)"
        )
    return ArtifactBytes(code=code, model=model_bytes, total=total, limit=limit, files=files)
