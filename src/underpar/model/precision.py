"""Which parameters are "control" parameters, and the baseline's mixed-precision layout:
bf16 where it is cheap and harmless, fp32 for matmul weights (cast at use) and for the
small gains, scales and mixes that steer the residual stream."""

from __future__ import annotations

import torch
from torch import nn

from underpar.model.linear import CastedLinear

# Substrings of parameter names that are control tensors: kept fp32 in training and in the
# exported artifact, and optimized with Adam rather than Muon even when they are 2-D.
CONTROL_PATTERNS: tuple[str, ...] = (
    "attn_scale",
    "attn_scales",
    "mlp_scale",
    "mlp_scales",
    "resid_mix",
    "resid_mixes",
    "q_gain",
    "attn_gate_w",
    "skip_weight",
    "skip_weights",
    "parallel_resid_lambdas",
    "parallel_post_lambdas",
    "smear_gate",
    "bigram.scale",
)


def is_control(name: str) -> bool:
    """True for a parameter whose name marks it as a control tensor."""
    return any(pattern in name for pattern in CONTROL_PATTERNS)


def keeps_fp32(name: str, param: torch.Tensor) -> bool:
    """Control tensors and every vector/scalar stay fp32 when the model body is bf16."""
    return param.ndim < 2 or is_control(name)


def cast_for_bf16_training(model: nn.Module) -> nn.Module:
    """The reference script's precision layout, in place: cast everything to bf16, then put
    CastedLinear weights back to fp32 (they are cast to bf16 at matmul time) and keep
    vectors, scalars and control tensors fp32. What is left in bf16 is the token embedding
    (and so the tied output head). Run the forward under bf16 autocast, as the reference does.
    """
    model.bfloat16()
    for module in model.modules():  # model.dropout's rate (model/block.py) stays exact
        if getattr(module, "dropout_rate", None) is not None:
            module.dropout_rate = module.dropout_rate.float()
    for module in model.modules():
        if isinstance(module, CastedLinear):
            module.float()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if keeps_fp32(name, param) and param.dtype != torch.float32:
                param.data = param.data.float()
    return model
