"""The records' mixed export (`quant.scheme = "mixed"`): per-row intN codes with fp16 scales
for every large float tensor: block matrices at `quant.matrix_bits` (int6 in the records),
embeddings at `quant.embed_bits` (int8 or int7), each row clipped by `quant.clip` (SDClip
k * std(row) by default); codes by round-to-nearest, or by GPTQ where a calibration Hessian
is given; LQER low-rank corrections on the worst tensors; small and control tensors kept
as floats exactly as the baseline keeps them (fp16; control tensors fp32).

Format (nested dicts, loadable with `torch.load(weights_only=True)`):
  {"format": FORMAT, "tensors": {name: entry}} with entry one of
    {"kind": "int", "bits", "q" int8 [rows, cols], "scale" fp16 [rows], "shape", "dtype",
     "method" ("rtn" | "gptq"), optional "lqer": quant/lqer.py factors}
    {"kind": "float", "t" stored tensor, "dtype" original dtype}
    {"kind": "raw", "t"}                                  (non-float tensors, unchanged)
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from underpar.errors import ArtifactError
from underpar.quant.base import QUANTIZERS
from underpar.quant.clip import round_to_nearest, row_scales
from underpar.quant.gptq import gptq_codes
from underpar.quant.lqer import lqer_delta, lqer_factors, worst

if TYPE_CHECKING:
    from underpar.quant.config import QuantConfig

FORMAT = "underpar-mixed-v1"


def qmax_of(bits: int) -> int:
    """Largest code of a symmetric `bits`-wide quantizer (int6: 31; the records' clip_range)."""
    return (1 << (bits - 1)) - 1


def as_rows(t: Tensor) -> Tensor:
    """A tensor as 2-D rows: matrices as they are, higher ranks by their first dim, 1-D as one row."""
    return t.reshape(t.shape[0], -1) if t.ndim >= 2 else t.reshape(1, -1)


def _dtype(name: str) -> torch.dtype:
    return getattr(torch, name)


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def kept_float(t: Tensor, control: bool) -> Tensor:
    """The baseline's rule for small tensors: control tensors fp32, fp32/bf16 as fp16, fp16 and
    wider dtypes unchanged."""
    if control:
        return t.float().contiguous()
    return (t.to(torch.float16) if t.dtype in (torch.float32, torch.bfloat16) else t).contiguous()


def dequantize_int(entry: Mapping[str, Any], with_lqer: bool = True) -> Tensor:
    """fp32 rows of an "int" entry (plus its LQER correction if it has one)."""
    w = entry["q"].float() * entry["scale"].float()[:, None]
    if with_lqer and "lqer" in entry:
        w = w + lqer_delta(entry["lqer"])
    return w


def quantize_mixed(
    state_dict: Mapping[str, Tensor],
    control_patterns: tuple[str, ...],
    cfg: QuantConfig,
    hessians: Mapping[str, Tensor] | None = None,
) -> tuple[dict[str, Any], dict[str, int]]:
    """(object for torch.save, stats). `hessians` (weight name -> H = E[x x^T] of its inputs)
    turns round-to-nearest into GPTQ for the tensors it covers."""
    tensors: dict[str, dict[str, Any]] = {}
    originals: dict[str, Tensor] = {}
    errors: dict[str, float] = {}
    stats = dict.fromkeys(("param_count", "num_tensors", "num_quantized", "num_gptq", "num_lqer",
                           "num_kept_float", "num_nonfloat"), 0)
    for name, tensor in state_dict.items():
        t = tensor.detach().to("cpu").contiguous()
        stats["param_count"] += t.numel()
        stats["num_tensors"] += 1
        if not t.is_floating_point():
            tensors[name] = {"kind": "raw", "t": t}
            stats["num_nonfloat"] += 1
            continue
        if not torch.isfinite(t).all():
            raise ArtifactError(f"{name} holds NaN or infinite values; the model diverged, so there is "
                                "nothing to export (lower the learning rates or check the run's losses)")
        if t.numel() <= cfg.keep_float_max_numel or t.ndim == 0:
            control = any(p in name for p in control_patterns)
            tensors[name] = {"kind": "float", "t": kept_float(t, control), "dtype": _dtype_name(t.dtype)}
            stats["num_kept_float"] += 1
            continue
        embedding = any(p in name for p in cfg.embed_patterns)
        bits = cfg.embed_bits if embedding else cfg.matrix_bits
        qmax = qmax_of(bits)
        w = as_rows(t).float()
        scale = row_scales(cfg.clip(w, qmax, embedding), qmax)
        H = None if hessians is None else hessians.get(name)
        if H is not None and H.shape == (w.shape[1], w.shape[1]):
            q = gptq_codes(w, H, scale, qmax, block_size=cfg.gptq_block_size, damp=cfg.gptq_damp,
                           act_order=cfg.gptq_act_order)
            method = "gptq"
            stats["num_gptq"] += 1
        else:
            q, method = round_to_nearest(w, scale, qmax), "rtn"
        entry = {"kind": "int", "bits": bits, "q": q, "scale": scale, "shape": list(t.shape),
                 "dtype": _dtype_name(t.dtype), "method": method}
        tensors[name] = entry
        stats["num_quantized"] += 1
        if cfg.lqer_rank > 0:
            originals[name] = w
            errors[name] = float((w - dequantize_int(entry)).norm())
    if cfg.lqer_rank > 0:
        for name in worst(errors, cfg.lqer_top_k):
            entry = tensors[name]
            entry["lqer"] = lqer_factors(originals[name] - dequantize_int(entry), cfg.lqer_rank, cfg.lqer_bits)
            stats["num_lqer"] += 1
    return {"format": FORMAT, "tensors": tensors}, stats


def dequantize_mixed(obj: Mapping[str, Any]) -> dict[str, Tensor]:
    """The state dict back, every tensor in its original dtype and shape."""
    if not isinstance(obj, Mapping) or obj.get("format") != FORMAT:
        found = obj.get("format") if isinstance(obj, Mapping) else type(obj).__name__
        raise ArtifactError(f"not an {FORMAT} object (format {found!r}); "
                            "load it with the quant.scheme it was exported with")
    out: dict[str, Tensor] = {}
    for name, entry in obj["tensors"].items():
        kind = entry["kind"]
        if kind == "raw":
            out[name] = entry["t"]
        elif kind == "float":
            out[name] = entry["t"].to(_dtype(entry["dtype"])).contiguous()
        elif kind == "int":
            w = dequantize_int(entry)
            out[name] = w.reshape(entry["shape"]).to(_dtype(entry["dtype"])).contiguous()
        else:
            raise ArtifactError(f"tensor {name!r} has an unknown storage kind {kind!r}; the artifact is foreign")
    return out


@QUANTIZERS.register("mixed")
class Mixed:
    """Per-row intN (int6 matrices, int8 embeddings by default) with clip search, optional
    GPTQ and LQER; small and control tensors kept as floats."""

    quantize = staticmethod(quantize_mixed)
    dequantize = staticmethod(dequantize_mixed)
