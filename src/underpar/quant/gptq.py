"""GPTQ for per-row intN codes: quantize one column at a time and push each column's rounding
error onto the columns not yet quantized, weighted by the layer's input statistics
H = X^T X, so the layer's outputs X W^T move as little as possible (Frantar et al. 2022).

`collect_hessians` gathers H for every CastedLinear (and the tied output embedding) with
forward hooks over calibration batches; `gptq_codes` quantizes one weight with its H. The
calibration data itself is built by quant/calibrate.py, which refuses validation data.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor, nn

from underpar.errors import ArtifactError
from underpar.model.linear import CastedLinear

# Damping retries multiply the relative damping by this until H + damp*I factors.
_DAMP_GROWTH = 10.0
_DAMP_TRIES = 6


def _inverse_cholesky(H: Tensor, damp: float) -> Tensor:
    """Upper Cholesky factor of (H + damp * mean(diag H) * I)^-1; damping grows until it factors."""
    mean_diag = H.diagonal().mean().clamp_min(1e-12)
    eye = torch.eye(H.shape[0], dtype=H.dtype, device=H.device)
    relative = max(damp, 1e-6)
    for _ in range(_DAMP_TRIES):
        L, info = torch.linalg.cholesky_ex(H + relative * mean_diag * eye)
        if int(info) == 0:
            Hinv = torch.cholesky_inverse(L)
            U, info = torch.linalg.cholesky_ex(Hinv, upper=True)
            if int(info) == 0:
                return U
        relative *= _DAMP_GROWTH
    raise ArtifactError(f"GPTQ: the calibration Hessian ({H.shape[0]} columns) stays singular even with "
                        f"damping {relative / _DAMP_GROWTH:g}; calibrate on more tokens (quant.gptq_calibration_batches)")


@torch.no_grad()
def gptq_codes(w_rows: Tensor, H: Tensor, scale: Tensor, qmax: int, *, block_size: int = 128,
               damp: float = 0.01, act_order: bool = True) -> Tensor:
    """int8 codes in [-qmax, qmax] of `w_rows` [rows, cols] on the fixed per-row fp16 `scale`,
    chosen by GPTQ with the input Hessian `H` [cols, cols].

    Columns no calibration input reached (H[i, i] = 0) do not matter to the outputs: they get
    weight 0. With `act_order`, columns are visited by decreasing H[i, i] (the inputs with the
    most energy first, while the most columns remain to absorb their error)."""
    rows, cols = w_rows.shape
    if H.shape != (cols, cols):
        raise ArtifactError(f"GPTQ: Hessian of shape {tuple(H.shape)} for a weight with {cols} columns")
    device = H.device
    W = w_rows.to(device=device, dtype=torch.float32).clone()
    H = H.to(torch.float32).clone()
    dead = H.diagonal() == 0
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    perm = torch.argsort(H.diagonal(), descending=True) if act_order else torch.arange(cols, device=device)
    W, H = W[:, perm], H[perm][:, perm]
    U = _inverse_cholesky(H, damp)
    s = scale.to(device=device, dtype=torch.float32)
    Q = torch.empty(rows, cols, dtype=torch.int8, device=device)
    for start in range(0, cols, block_size):
        end = min(start + block_size, cols)
        block = W[:, start:end].clone()
        U_block = U[start:end, start:end]
        errors = torch.empty(rows, end - start, device=device)
        for j in range(end - start):
            column = block[:, j]
            q = torch.clamp(torch.round(column / s), -qmax, qmax)
            Q[:, start + j] = q.to(torch.int8)
            err = (column - q * s) / U_block[j, j]
            errors[:, j] = err
            block[:, j + 1:] -= err[:, None] * U_block[j, j + 1:][None, :]
        W[:, end:] -= errors @ U[start:end, end:]
    return Q[:, torch.argsort(perm)].cpu()


def head_weight_name(model: nn.Module) -> str | None:
    """The weight that multiplies the final hidden states: the tied embedding or lm_head."""
    if getattr(model, "lm_head", None) is not None:
        return "lm_head.weight"
    return "tok_emb.weight" if hasattr(model, "tok_emb") else None


@torch.no_grad()
def collect_hessians(model: nn.Module, batches: Iterable[Tensor]) -> dict[str, Tensor]:
    """{weight name: mean over calibration rows of x x^T} (fp32, CPU) for every CastedLinear's
    input and the output head's input, from forward passes over `batches` of input ids."""
    sums: dict[str, Tensor] = {}
    rows: dict[str, int] = {}

    def add(name: str, x: Tensor) -> None:
        x = x.detach().reshape(-1, x.shape[-1]).float()
        if name not in sums:
            sums[name] = torch.zeros(x.shape[1], x.shape[1], device=x.device)
            rows[name] = 0
        sums[name].addmm_(x.T, x)
        rows[name] += x.shape[0]

    hooks = [module.register_forward_pre_hook(lambda m, args, name=f"{prefix}.weight": add(name, args[0]))
             for prefix, module in model.named_modules() if isinstance(module, CastedLinear)]
    head = head_weight_name(model)
    was_training = model.training
    model.eval()
    try:
        for input_ids in batches:
            if hasattr(model, "hidden") and head is not None:
                # The head's input is the final hidden state; the lm_head hook (untied) does
                # not fire because the logits are never computed.
                add(head, model.hidden(input_ids))
            else:
                model(input_ids)
    finally:
        for hook in hooks:
            hook.remove()
        model.train(was_training)
    if not sums:
        raise ArtifactError("GPTQ: the calibration batches reached no linear layer; give at least one batch")
    return {name: (total / max(rows[name], 1)).cpu() for name, total in sums.items()}
