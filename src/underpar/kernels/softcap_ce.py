"""Softcapped cross-entropy, the golf model's loss, in one pass over the logits: Triton on
CUDA, a pure-torch reference elsewhere (and to check the kernel against).

    z    = cap * tanh(x / cap)                  # x: the head's output [N, V] (bf16 or fp32)
    lse  = logsumexp(z)                         # per row, fp32
    loss = lse - z[target]                      # per row; the mean over rows by default
    dL/dx = g * (softmax(z) - onehot(target)) * (1 - tanh(x / cap)**2)

Why a kernel: the eager/compiled path materialises the capped logits in fp32 (4 bytes per
logit, 256 MB at 65,536 tokens x 1024) and reads them again in the backward. The kernel
reads x once forward and once backward, keeps z in registers, saves only the per-row lse
(4 bytes per row) and writes dL/dx straight in x's dtype.

Kernel arithmetic (equal to the definition up to fp32 rounding): cap * tanh(x / cap) =
2cap * sigmoid(2x / cap) - cap. The kernel uses z' = z + cap = 2cap * sigmoid(2x / cap),
whose logsumexp is lse + cap and whose derivative is 4 * s * (1 - s) with s the sigmoid;
the shift cancels in the loss and is taken off the stored lse, so both paths return the
true lse. cap = 0 means no cap (plain cross-entropy), as `model.embeddings.logit_softcap` = 0.

Targets must lie in [0, V): like F.cross_entropy on CUDA, the kernel does not check them
(a check would synchronise the device every step); the reference raises on CPU.

Under torch.compile(fullgraph=True) the forward and backward are two `torch.library` custom
ops (`underpar::softcap_ce_fwd` / `_bwd`) with fake (shape) implementations and a registered
autograd formula: dynamo traces through them without a graph break, and inductor calls them
as they are. Their default implementation is the reference; CUDA gets the kernel.
"""

from __future__ import annotations

import torch
from torch import Tensor

try:  # the GPU fast path; everything else works without Triton
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the machine
    triton = tl = None

DTYPES = (torch.float32, torch.bfloat16, torch.float16)
REDUCTIONS = ("mean", "sum", "none")
# Launch shape: each program handles ROWS rows of BLOCK_V columns at a time, about
# ELEMENTS_PER_PROGRAM logits per loop step (16 per thread at 8 warps): the golf shape
# (V = 1024) gets 4 whole rows per program, V = 8192 one row in two steps.
ELEMENTS_PER_PROGRAM = 4096
MAX_BLOCK_V = 4096
NUM_WARPS = 8


# --------------------------------------------------------------------------- torch reference


def _capped(x_f32: Tensor, cap: float) -> tuple[Tensor, Tensor | None]:
    """(z, dz/dx) for fp32 logits; dz/dx is None without a cap (it is 1)."""
    if cap <= 0:
        return x_f32, None
    t = torch.tanh(x_f32 / cap)
    return cap * t, 1 - t * t


def reference_forward(logits: Tensor, targets: Tensor, cap: float) -> tuple[Tensor, Tensor]:
    """(per-row loss, per-row lse), both fp32 [N], for logits [N, V] and int64 targets [N]."""
    z, _ = _capped(logits.float(), cap)
    lse = torch.logsumexp(z, dim=-1)
    return lse - z.gather(-1, targets[:, None]).squeeze(-1), lse


def reference_backward(logits: Tensor, targets: Tensor, lse: Tensor, grad_losses: Tensor,
                       cap: float) -> Tensor:
    """dL/dlogits [N, V] in the logits' dtype, given dL/dloss per row [N] and the forward's lse."""
    z, dz_dx = _capped(logits.float(), cap)
    grad = torch.exp(z - lse[:, None])  # the softmax of the capped logits
    grad.scatter_add_(-1, targets[:, None], torch.full_like(lse[:, None], -1.0))
    grad *= grad_losses.float()[:, None]
    if dz_dx is not None:
        grad *= dz_dx
    return grad.to(logits.dtype).contiguous()  # the layout the fake implementation promises


# --------------------------------------------------------------------------- Triton kernels

if triton is not None:

    @triton.jit
    def _shifted_capped(x, scale_in, scale_out, CAPPED: tl.constexpr):
        """(z + cap, sigmoid) with z = cap * tanh(x / cap); (x, unused) without a cap."""
        if CAPPED:
            s = tl.sigmoid(x * scale_in)
            z = scale_out * s
        else:
            s = x
            z = x
        return z, s

    @triton.jit
    def _fwd_kernel(x_ptr, t_ptr, loss_ptr, lse_ptr, n_rows, n_cols, stride_x, shift,
                    scale_in, scale_out, CAPPED: tl.constexpr, ROWS: tl.constexpr,
                    BLOCK_V: tl.constexpr):
        rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
        row_ok = rows < n_rows
        row_ptr = x_ptr + rows.to(tl.int64)[:, None] * stride_x
        # Online logsumexp over column blocks; out-of-range rows read zeros and are not stored.
        run_max = tl.full([ROWS], float("-inf"), tl.float32)
        run_sum = tl.zeros([ROWS], tl.float32)
        for start in range(0, n_cols, BLOCK_V):
            cols = start + tl.arange(0, BLOCK_V)
            col_ok = cols < n_cols
            x = tl.load(row_ptr + cols[None, :], mask=row_ok[:, None] & col_ok[None, :], other=0.0)
            z, _ = _shifted_capped(x.to(tl.float32), scale_in, scale_out, CAPPED)
            z = tl.where(col_ok[None, :], z, float("-inf"))
            new_max = tl.maximum(run_max, tl.max(z, axis=1))
            run_sum = run_sum * tl.exp(run_max - new_max) + tl.sum(tl.exp(z - new_max[:, None]), axis=1)
            run_max = new_max
        lse_shifted = run_max + tl.log(run_sum)
        target = tl.load(t_ptr + rows, mask=row_ok, other=0)
        x_t = tl.load(x_ptr + rows.to(tl.int64) * stride_x + target, mask=row_ok, other=0.0)
        z_t, _ = _shifted_capped(x_t.to(tl.float32), scale_in, scale_out, CAPPED)
        tl.store(loss_ptr + rows, lse_shifted - z_t, mask=row_ok)
        tl.store(lse_ptr + rows, lse_shifted - shift, mask=row_ok)

    @triton.jit
    def _bwd_kernel(x_ptr, t_ptr, lse_ptr, g_ptr, dx_ptr, n_rows, n_cols, stride_x, stride_g,
                    stride_dx, shift, scale_in, scale_out, CAPPED: tl.constexpr,
                    ROWS: tl.constexpr, BLOCK_V: tl.constexpr):
        rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
        row_ok = rows < n_rows
        rows64 = rows.to(tl.int64)
        lse_shifted = tl.load(lse_ptr + rows, mask=row_ok, other=0.0) + shift
        g = tl.load(g_ptr + rows64 * stride_g, mask=row_ok, other=0.0).to(tl.float32)
        target = tl.load(t_ptr + rows, mask=row_ok, other=0)
        for start in range(0, n_cols, BLOCK_V):
            cols = start + tl.arange(0, BLOCK_V)
            ok = row_ok[:, None] & (cols < n_cols)[None, :]
            x = tl.load(x_ptr + rows64[:, None] * stride_x + cols[None, :], mask=ok, other=0.0)
            z, s = _shifted_capped(x.to(tl.float32), scale_in, scale_out, CAPPED)
            d = tl.exp(z - lse_shifted[:, None]) - tl.where(cols[None, :] == target[:, None], 1.0, 0.0)
            d = d * g[:, None]
            if CAPPED:
                d = d * (4.0 * s * (1.0 - s))
            tl.store(dx_ptr + rows64[:, None] * stride_dx + cols[None, :],
                     d.to(dx_ptr.dtype.element_ty), mask=ok)


def triton_available() -> bool:
    return triton is not None


def launch_shape(n_cols: int) -> tuple[int, int]:
    """(rows per program, columns per loop step) for a vocabulary of `n_cols`."""
    block_v = min(MAX_BLOCK_V, triton.next_power_of_2(max(n_cols, 1)))
    return max(1, ELEMENTS_PER_PROGRAM // block_v), block_v


def _scalars(cap: float) -> dict:
    capped = cap > 0
    return dict(shift=float(cap) if capped else 0.0, scale_in=2.0 / cap if capped else 1.0,
                scale_out=2.0 * cap if capped else 1.0, CAPPED=capped)


def triton_forward(logits: Tensor, targets: Tensor, cap: float) -> tuple[Tensor, Tensor]:
    """The kernel with `reference_forward`'s contract (CUDA tensors)."""
    logits = logits if logits.stride(-1) == 1 else logits.contiguous()
    targets = targets.contiguous()
    n_rows, n_cols = logits.shape
    losses = torch.empty(n_rows, dtype=torch.float32, device=logits.device)
    lse = torch.empty_like(losses)
    if n_rows:
        rows, block_v = launch_shape(n_cols)
        _fwd_kernel[(triton.cdiv(n_rows, rows),)](
            logits, targets, losses, lse, n_rows, n_cols, logits.stride(0), **_scalars(cap),
            ROWS=rows, BLOCK_V=block_v, num_warps=NUM_WARPS)
    return losses, lse


def triton_backward(logits: Tensor, targets: Tensor, lse: Tensor, grad_losses: Tensor,
                    cap: float) -> Tensor:
    """The kernel with `reference_backward`'s contract (CUDA tensors)."""
    logits = logits if logits.stride(-1) == 1 else logits.contiguous()
    targets, lse = targets.contiguous(), lse.contiguous()
    n_rows, n_cols = logits.shape
    grad = torch.empty((n_rows, n_cols), dtype=logits.dtype, device=logits.device)
    if n_rows:
        rows, block_v = launch_shape(n_cols)
        # grad_losses may be the mean's expanded scalar (stride 0): read it in place.
        _bwd_kernel[(triton.cdiv(n_rows, rows),)](
            logits, targets, lse, grad_losses, grad, n_rows, n_cols, logits.stride(0),
            grad_losses.stride(0), grad.stride(0), **_scalars(cap),
            ROWS=rows, BLOCK_V=block_v, num_warps=NUM_WARPS)
    return grad


# --------------------------------------------------------------------------- custom ops


@torch.library.custom_op("underpar::softcap_ce_fwd", mutates_args=())
def _fwd_op(logits: Tensor, targets: Tensor, cap: float) -> tuple[Tensor, Tensor]:
    return reference_forward(logits, targets, cap)


@torch.library.custom_op("underpar::softcap_ce_bwd", mutates_args=())
def _bwd_op(logits: Tensor, targets: Tensor, lse: Tensor, grad_losses: Tensor, cap: float) -> Tensor:
    return reference_backward(logits, targets, lse, grad_losses, cap)


@_fwd_op.register_fake
def _fwd_fake(logits: Tensor, targets: Tensor, cap: float) -> tuple[Tensor, Tensor]:
    rows = logits.shape[0]
    return logits.new_empty(rows, dtype=torch.float32), logits.new_empty(rows, dtype=torch.float32)


@_bwd_op.register_fake
def _bwd_fake(logits: Tensor, targets: Tensor, lse: Tensor, grad_losses: Tensor, cap: float) -> Tensor:
    return logits.new_empty(logits.shape)


if triton is not None:
    _fwd_op.register_kernel("cuda")(triton_forward)
    _bwd_op.register_kernel("cuda")(triton_backward)


def _setup_context(ctx, inputs, output) -> None:
    logits, targets, cap = inputs
    ctx.save_for_backward(logits, targets, output[1])
    ctx.cap = cap


def _backward(ctx, grad_losses: Tensor, _grad_lse: Tensor | None):
    # The lse output stays inside `softcap_cross_entropy`, so no gradient reaches it.
    logits, targets, lse = ctx.saved_tensors
    return _bwd_op(logits, targets, lse, grad_losses, ctx.cap), None, None


_fwd_op.register_autograd(_backward, setup_context=_setup_context)


# --------------------------------------------------------------------------- entry point


def softcap_cross_entropy(logits: Tensor, targets: Tensor, cap: float, reduction: str = "mean") -> Tensor:
    """Cross-entropy of cap * tanh(logits / cap) against `targets`, in fp32: the mean over all
    tokens (default), their sum, or per token ("none", shaped like `targets`).

    logits [..., V] in fp32/bf16/fp16 (the head's output before the cap), targets [...] of
    integer ids in [0, V); cap >= 0 (0: no cap). The gradient reaches `logits` in their dtype.
    """
    if logits.dtype not in DTYPES:
        raise ValueError(f"softcap_cross_entropy: logits dtype {logits.dtype} is not one of "
                         f"{', '.join(str(d) for d in DTYPES)}")
    if logits.ndim < 1 or logits.shape[:-1] != targets.shape:
        raise ValueError(f"softcap_cross_entropy: logits {tuple(logits.shape)} need targets shaped "
                         f"like them without the last (vocabulary) dimension, got {tuple(targets.shape)}")
    if targets.dtype.is_floating_point or targets.dtype.is_complex or targets.dtype == torch.bool:
        raise ValueError(f"softcap_cross_entropy: targets must be integer ids, got {targets.dtype}")
    if not cap >= 0:
        raise ValueError(f"softcap_cross_entropy: cap must be >= 0 (0 = no cap), got {cap}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"softcap_cross_entropy: unknown reduction {reduction!r}; "
                         f"choose one of {', '.join(REDUCTIONS)}")
    losses, _ = _fwd_op(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1).long(), float(cap))
    if reduction == "mean":
        return losses.mean()
    if reduction == "sum":
        return losses.sum()
    return losses.view(targets.shape)
