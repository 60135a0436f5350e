"""The parameter-golf baseline export (`quant.scheme = "int8"`): per-row int8 weights with fp16
scales, small tensors kept as floats.

Format (a plain dict of dicts, loadable with `torch.load(weights_only=True)`):
  quantized[name]   int8 values; scales[name] fp16 per row (2-D) or an fp32 scalar (other shapes)
  passthrough[name] tensors stored as they are: non-floats, small floats (fp16), control (fp32)
  dtypes[name]      the original dtype of every float tensor, restored by dequantization
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from underpar.errors import ArtifactError
from underpar.quant.base import QUANTIZERS

if TYPE_CHECKING:
    from underpar.quant.config import QuantConfig

FORMAT = "underpar-int8-v1"
CLIP_PERCENTILE = 99.99984
KEEP_FLOAT_MAX_NUMEL = 65_536
QMAX = 127
# The baseline floors per-row scales at 1/127 (so rows with |w| < 1 get a coarser step than
# their range needs; parameter-golf issue #775 discusses the same floor for int6). Kept for
# fidelity; it also keeps every scale well inside fp16's normal range.
MIN_ROW_SCALE = 1.0 / QMAX


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _nbytes(t: Tensor) -> int:
    return t.numel() * t.element_size()


def quantize_rows(w: Tensor, clip_percentile: float = CLIP_PERCENTILE) -> tuple[Tensor, Tensor]:
    """(int8 values, fp16 scale per row) of a 2-D tensor.

    Each row is clipped at the `clip_percentile` of its |w| (torch.quantile, linear
    interpolation), scale = clip / 127 floored at 1/127, values round-half-even and clamp to
    [-127, 127]. Unlike the baseline, which divides by the fp32 scale and then stores it as
    fp16, this divides by the fp16 scale it stores, so the round-trip error of an unclipped
    value is at most half a step.
    """
    w32 = w.float()
    clip = torch.quantile(w32.abs(), clip_percentile / 100.0, dim=1)
    scale = (clip / QMAX).clamp_min(MIN_ROW_SCALE).to(torch.float16)
    clipped = torch.maximum(torch.minimum(w32, clip[:, None]), -clip[:, None])
    q = torch.clamp(torch.round(clipped / scale.float()[:, None]), -QMAX, QMAX)
    return q.to(torch.int8).contiguous(), scale.contiguous()


def quantize_whole(t: Tensor, clip_percentile: float = CLIP_PERCENTILE) -> tuple[Tensor, Tensor]:
    """(int8 values, fp32 scalar scale) of a tensor that is not 2-D, as the baseline does."""
    t32 = t.float()
    clip = float(torch.quantile(t32.abs().flatten(), clip_percentile / 100.0))
    scale = torch.tensor(clip / QMAX if clip > 0 else 1.0, dtype=torch.float32)
    q = torch.clamp(torch.round(t32.clamp(-clip, clip) / scale), -QMAX, QMAX)
    return q.to(torch.int8).contiguous(), scale


def quantize_state_dict(
    state_dict: Mapping[str, Tensor],
    control_patterns: tuple[str, ...],
    *,
    clip_percentile: float = CLIP_PERCENTILE,
    keep_float_max_numel: int = KEEP_FLOAT_MAX_NUMEL,
) -> tuple[dict[str, Any], dict[str, int]]:
    """(quantized object, stats). A name is a control tensor if it contains any of
    `control_patterns`; the pattern matters only for tensors small enough to be kept."""
    quantized: dict[str, Tensor] = {}
    scales: dict[str, Tensor] = {}
    passthrough: dict[str, Tensor] = {}
    dtypes: dict[str, str] = {}
    stats = dict.fromkeys(
        ("param_count", "num_tensors", "num_quantized", "num_kept_float", "num_nonfloat",
         "baseline_tensor_bytes", "payload_bytes"),
        0,
    )
    for name, tensor in state_dict.items():
        t = tensor.detach().to("cpu").contiguous()
        stats["param_count"] += t.numel()
        stats["num_tensors"] += 1
        stats["baseline_tensor_bytes"] += _nbytes(t)
        if not t.is_floating_point():
            passthrough[name] = t
            stats["num_nonfloat"] += 1
            stats["payload_bytes"] += _nbytes(t)
            continue
        dtypes[name] = _dtype_name(t.dtype)
        if t.numel() <= keep_float_max_numel:
            if any(p in name for p in control_patterns):
                kept = t.float()
            elif t.dtype in (torch.float32, torch.bfloat16):
                kept = t.to(torch.float16)
            else:  # already fp16, or a dtype the baseline leaves alone (fp64)
                kept = t
            passthrough[name] = kept.contiguous()
            stats["num_kept_float"] += 1
            stats["payload_bytes"] += _nbytes(kept)
            continue
        q, s = quantize_rows(t, clip_percentile) if t.ndim == 2 else quantize_whole(t, clip_percentile)
        quantized[name], scales[name] = q, s
        stats["num_quantized"] += 1
        stats["payload_bytes"] += _nbytes(q) + _nbytes(s)
    obj = {
        "format": FORMAT,
        "quantized": quantized,
        "scales": scales,
        "passthrough": passthrough,
        "dtypes": dtypes,
    }
    return obj, stats


def dequantize_state_dict(obj: Mapping[str, Any]) -> dict[str, Tensor]:
    """The state dict back, with every tensor in its original dtype and shape."""
    if obj.get("format") != FORMAT:
        raise ArtifactError(f"not an {FORMAT} object (format {obj.get('format')!r}); "
                            "load it with the quant.scheme it was exported with")
    out: dict[str, Tensor] = {}
    for name, q in obj["quantized"].items():
        s = obj["scales"][name].float()
        if s.ndim > 0:  # one scale per row, broadcast over the rest
            s = s.view(q.shape[0], *([1] * (q.ndim - 1)))
        out[name] = (q.float() * s).to(getattr(torch, obj["dtypes"][name])).contiguous()
    for name, t in obj["passthrough"].items():
        dtype = obj["dtypes"].get(name)
        out[name] = t.to(getattr(torch, dtype)).contiguous() if dtype else t
    return out


@QUANTIZERS.register("int8")
class Int8:
    """Per-row int8 with fp16 scales; small and control tensors kept as floats."""

    @staticmethod
    def quantize(
        state_dict: Mapping[str, Tensor],
        control_patterns: tuple[str, ...],
        cfg: QuantConfig,
        hessians: Mapping[str, Tensor] | None = None,
    ) -> tuple[dict[str, Any], dict[str, int]]:
        """The baseline has no use for calibration Hessians: `hessians` is ignored."""
        return quantize_state_dict(state_dict, control_patterns, clip_percentile=cfg.clip_percentile,
                                   keep_float_max_numel=cfg.keep_float_max_numel)

    dequantize = staticmethod(dequantize_state_dict)
