"""The artifact: write and read the compressed quantized model, and count its bytes against the
parameter-golf limit (code bytes + compressed model bytes <= 16,000,000)."""

from __future__ import annotations

import dataclasses
import functools
import io
import os
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

import underpar
from underpar.errors import ArtifactError
from underpar.quant import codewrap, container, rowquant
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
    "kernels/softcap_ce.py",
    "eval/config.py",
    "eval/score.py",
    "eval/sliding.py",
    "eval/ttt.py",
    "eval/ttt_docs.py",
    "stages.py",
    "runs/clock.py",
    "tracks/pretrain.py",
    "tracks/pretrain_trainer.py",
    "config.py",
    "registry.py",
    "errors.py",
)
# The Hugging Face modules under model/ that only fine-tuning and RandOpt use.
NOT_COUNTED = ("model/hf.py", "model/smollm2.py", "model/surgery.py")


@dataclasses.dataclass(frozen=True)
class Exported:
    """What `export` wrote: the model's byte count, the quantizer's stats and, for the grouped
    container, the per-group report of every packing x compressor tried."""

    model_bytes: int
    stats: dict[str, int]
    report: dict[str, Any]


def export(
    state_dict: Mapping[str, Tensor],
    cfg: QuantConfig,
    path: str | os.PathLike[str],
    control_patterns: tuple[str, ...],
    hessians: Mapping[str, Tensor] | None = None,
) -> Exported:
    """Quantize `state_dict` (GPTQ where `hessians` cover a tensor), encode, write to `path`."""
    obj, stats = QUANTIZERS[cfg.scheme].quantize(state_dict, control_patterns, cfg, hessians)
    return export_quantized(obj, cfg, path, stats)


def export_quantized(obj: Mapping[str, Any], cfg: QuantConfig, path: str | os.PathLike[str],
                     stats: Mapping[str, int] | None = None) -> Exported:
    """Encode an already quantized object (e.g. from `gptq_quantize`) and write it to `path`.
    The file appears complete or not at all."""
    if cfg.container == "grouped":
        blob, report = container.encode(obj, cfg.compressors, cfg.packings)
    else:
        buffer = io.BytesIO()
        torch.save(obj, buffer)
        blob = COMPRESSORS[cfg.compressor].compress(buffer.getvalue())
        report = {"container": "torch", "bytes": len(blob), "compressor": cfg.compressor}
    report["tensors"] = tensor_table(obj)
    compressed = report.pop("tensor_compressed_bytes", None)
    for row in report["tensors"]:
        if compressed is not None:  # the grouped container's estimate (share of its groups)
            row["compressed_bytes"] = compressed.get(row["name"], 0)
    if stats and stats.get("param_count"):
        report["bytes_per_parameter"] = len(blob) / stats["param_count"]
    _write_atomically(Path(path), blob)
    return Exported(model_bytes=len(blob), stats=dict(stats or {}), report=report)


def export_model(
    state_dict: Mapping[str, Tensor],
    cfg: QuantConfig,
    path: str | os.PathLike[str],
    control_patterns: tuple[str, ...],
) -> int:
    """Quantize, encode and write `state_dict` to `path`; the compressed byte count."""
    return export(state_dict, cfg, path, control_patterns).model_bytes


def _write_atomically(path: Path, blob: bytes) -> None:
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


def tensor_table(obj: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Per tensor of a quantized object: its storage scheme, bits and stored bytes (codes at one
    byte each, scales, LQER factors), before compression."""
    rows = []
    if obj.get("format") == rowquant.FORMAT:
        for name, e in obj["tensors"].items():
            if e["kind"] == "int":
                lqer = e.get("lqer")
                extra = 0 if lqer is None else sum(lqer[k].numel() * lqer[k].element_size()
                                                    for k in ("a", "b", "a_scale", "b_scale"))
                scheme = f"int{e['bits']} {e['method']}" + ("+lqer" if lqer else "")
                stored = e["q"].numel() + 2 * e["scale"].numel() + extra
                rows.append({"name": name, "scheme": scheme, "bits": e["bits"], "numel": e["q"].numel(), "bytes": stored})
            else:
                t = e["t"]
                rows.append({"name": name, "scheme": str(t.dtype).removeprefix("torch."), "bits": 8 * t.element_size(),
                             "numel": t.numel(), "bytes": t.numel() * t.element_size()})
        return rows
    for part, scheme in (("quantized", "int8"), ("passthrough", None)):
        for name, t in obj.get(part, {}).items():
            s = obj["scales"][name] if part == "quantized" else None
            extra = 0 if s is None else s.numel() * s.element_size()
            rows.append({"name": name, "scheme": scheme or str(t.dtype).removeprefix("torch."),
                         "bits": 8 * t.element_size(), "numel": t.numel(), "bytes": t.numel() * t.element_size() + extra})
    return rows


def load_model(path: str | os.PathLike[str], cfg: QuantConfig) -> dict[str, Tensor]:
    """The state dict from an artifact written by `export` with the same `cfg` (a grouped
    artifact names its own compressors; a torch one needs `cfg.compressor`)."""
    path = Path(path)
    try:
        blob = path.read_bytes()
    except FileNotFoundError:
        raise ArtifactError(f"artifact {path} does not exist; export the model first") from None
    if container.is_grouped(blob):
        try:
            obj = container.decode(blob)
        except ArtifactError as e:
            raise ArtifactError(f"artifact {path} ({len(blob):,} bytes): {e}") from None
        return rowquant.dequantize_mixed(obj)
    try:
        raw = COMPRESSORS[cfg.compressor].decompress(blob)
    except Exception as e:
        raise ArtifactError(
            f"artifact {path} ({len(blob):,} bytes) is truncated or corrupt: it does not decompress with "
            f"quant.compressor={cfg.compressor!r} ({e}); export the model again"
        ) from None
    try:
        # The object is dicts of tensors, strings and ints only, so the safe loader suffices.
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
    """Raw bytes of the files."""
    return sum(Path(f).stat().st_size for f in files)


def compressed_code(files: Sequence[Path]) -> tuple[str, int]:
    """(wrapper method, bytes) of the files bundled into the smallest self-extracting script;
    cached by the files' paths, sizes and modification times (compressing takes seconds)."""
    key = tuple((str(f), (st := Path(f).stat()).st_size, st.st_mtime_ns) for f in files)
    return _compressed_code(key)


@functools.lru_cache(maxsize=8)
def _compressed_code(key: tuple[tuple[str, int, int], ...]) -> tuple[str, int]:
    root = Path(underpar.__file__).parent
    method, script = codewrap.smallest_wrapper(codewrap.bundle([Path(f) for f, _, _ in key], root))
    return method, len(script)


@dataclasses.dataclass(frozen=True)
class ArtifactBytes:
    code: int  # counted: the source as a compressed self-extracting script
    model: int
    total: int
    limit: int
    files: tuple[Path, ...]
    code_raw: int = 0  # the same files uncompressed
    code_wrapper: str = ""

    def as_dict(self) -> dict:
        """For summaries: the byte counts and the counted files, relative to the package."""
        root = Path(underpar.__file__).parent
        return {"code": self.code, "model": self.model, "total": self.total, "limit": self.limit,
                "headroom": self.limit - self.total, "code_raw": self.code_raw, "code_wrapper": self.code_wrapper,
                "code_files": [str(p.relative_to(root)) for p in self.files]}


def account(model_bytes: int, limit: int = LIMIT_BYTES) -> ArtifactBytes:
    """Code + model bytes, the code counted as a compressed self-extracting script (as the
    records ship it); raises ArtifactError when the total is over `limit`."""
    files = tuple(code_files())
    code_raw = code_bytes(files)
    method, code = compressed_code(files)
    total = code + model_bytes
    if total > limit:
        raise ArtifactError(
            f"artifact is {total:,} bytes (code {code:,} compressed from {code_raw:,} + model {model_bytes:,}), "
            f"over the limit {limit:,} by {total - limit:,} bytes; shrink the model (fewer layers or "
            "less width) or quantize harder (quant.scheme)"
        )
    return ArtifactBytes(code=code, model=model_bytes, total=total, limit=limit, files=files,
                         code_raw=code_raw, code_wrapper=method)
