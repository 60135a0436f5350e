"""Decode attention in one pass, for the population engine (issue 18).

A decode step of the population engine has, per cache row and kv head, only the few query rows
that share the head (grouped-query attention: heads / kv_heads of them). Materialized-score
attention (`decode_attention_reference`, the engine's "matmul" choice) runs it as two batched
matmuls with the scores, the mask add, an fp32 softmax and two casts in between, and reads every
cache slot up to the length bucket. The kernel here does it in one pass per (row, head): scores,
the additive mask and an online softmax in fp32, and the weighted sum of V, so K and V are read
once and no score tensor is written; only the blocks between the row's first and last allowed
slots are read (not the left padding of a short prompt, nor the slots past the current token).

`decode_attention(q, k, v, mask, skip)`: q [n, H, M, D], k and v [n, H, L, D] (last dim
contiguous, any strides above: views of the cache), mask additive (0 or -inf) of shape
[n, 1, 1, L] or broadcastable to it, skip (optional) bool [n, H]: the (row, head) pairs whose
output is not needed (the population engine's finished candidates), which the kernel writes as
zeros without reading their K or V (the reference computes them) -> [n, H, M, D] in q's dtype.
The Triton kernel runs for bf16/fp16 CUDA tensors with M <= 16 query rows (decode) and a
power-of-two head size; everything else (a prefill's many query rows, fp32, a CPU) takes the
reference, so results in fp32 are the reference's.
"""

from __future__ import annotations

import torch
from torch import Tensor

try:  # the GPU fast path; everything else works without Triton
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the machine
    triton = tl = None

MAX_ROWS = 16  # query rows per (row, head) the kernel takes (tl.dot's smallest tile)
# cache slots per step of the kernel's loop, its software-pipeline stages, warps per program
CONFIG = {"BLOCK_L": 32, "STAGES": 3, "num_warps": 2}  # fastest of 27 on an H200 (decode_attention-h200.json)


def decode_attention_reference(q: Tensor, k: Tensor, v: Tensor, mask: Tensor, skip: Tensor | None = None) -> Tensor:
    """Materialized scores: q k^T * scale + mask, softmax in fp32, @ V (every pair computed)."""
    scores = (q @ k.transpose(-1, -2)) * q.shape[-1] ** -0.5 + mask
    return scores.softmax(-1, dtype=torch.float32).to(q.dtype) @ v


def kernel_applies(q: Tensor, mask: Tensor) -> bool:
    """Whether `decode_attention` runs the Triton kernel for these inputs."""
    D = q.shape[-1]
    return (triton is not None and q.is_cuda and q.dtype in (torch.bfloat16, torch.float16)
            and q.shape[-2] <= MAX_ROWS and 16 <= D <= 256 and D & (D - 1) == 0
            and mask.dim() == 4 and mask.shape[1] == mask.shape[2] == 1)


def decode_attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor, skip: Tensor | None = None) -> Tensor:
    if not kernel_applies(q, mask):
        return decode_attention_reference(q, k, v, mask)
    n, H, M, D = q.shape
    L = k.shape[-2]
    mask = mask.expand(n, 1, 1, L)
    q = q.contiguous() if q.stride(-1) != 1 else q
    out = torch.empty((n, H, M, D), dtype=q.dtype, device=q.device)
    flags = out if skip is None else skip.expand(n, H).contiguous().view(torch.uint8)  # out: not read
    _decode_attention_kernel[(n * H,)](
        q, k, v, mask, flags, out, H, M, L,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2), mask.stride(0), mask.stride(3),
        out.stride(0), out.stride(1), out.stride(2), D ** -0.5,
        D=D, BLOCK_M=MAX_ROWS, SKIP=skip is not None, **CONFIG)
    return out


if triton is not None:

    @triton.jit
    def _decode_attention_kernel(q_ptr, k_ptr, v_ptr, mask_ptr, skip_ptr, o_ptr, H, M, L,
                                 sq_n, sq_h, sq_m, sk_n, sk_h, sk_l, sv_n, sv_h, sv_l, sm_n, sm_l,
                                 so_n, so_h, so_m, scale,
                                 D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_L: tl.constexpr, SKIP: tl.constexpr,
                                 STAGES: tl.constexpr):
        pid = tl.program_id(0)
        row, head = pid // H, pid % H
        slots = tl.arange(0, BLOCK_L)
        # the row's allowed slots lie in [lo, hi): blocks outside are not read, and the main
        # loop has no branch (so its loads can be pipelined)
        lo, hi = L, 0
        for start in range(0, L, BLOCK_L):
            cols = start + slots
            bias = tl.load(mask_ptr + row * sm_n + cols * sm_l, mask=cols < L, other=float("-inf")).to(tl.float32)
            allowed = bias > float("-inf")
            lo = tl.minimum(lo, tl.min(tl.where(allowed, cols, L), axis=0))
            hi = tl.maximum(hi, tl.max(tl.where(allowed, cols + 1, 0), axis=0))
        if SKIP:  # a pair whose output is not needed reads nothing and writes zeros
            hi = tl.where(tl.load(skip_ptr + pid) != 0, 0, hi)
        rows_m = tl.arange(0, BLOCK_M)
        dims = tl.arange(0, D)
        q = tl.load(q_ptr + row * sq_n + head * sq_h + rows_m[:, None] * sq_m + dims[None, :],
                    mask=rows_m[:, None] < M, other=0.0)
        k_base = k_ptr + row * sk_n + head * sk_h
        v_base = v_ptr + row * sv_n + head * sv_h
        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, D], tl.float32)
        # the first block holds an allowed slot, so m_i is finite after it; a block of ruled-out
        # slots later adds nothing (p = 0)
        for start in tl.range(lo // BLOCK_L * BLOCK_L, hi, BLOCK_L, num_stages=STAGES):
            cols = start + slots
            bias = tl.load(mask_ptr + row * sm_n + cols * sm_l, mask=cols < L, other=float("-inf")).to(tl.float32)
            k = tl.load(k_base + cols[:, None] * sk_l + dims[None, :], mask=cols[:, None] < L, other=0.0)
            s = tl.dot(q, tl.trans(k)) * scale + bias[None, :]
            m_new = tl.maximum(m_i, tl.max(s, axis=1))
            alpha = tl.exp(m_i - m_new)
            p = tl.exp(s - m_new[:, None])
            l_i = l_i * alpha + tl.sum(p, axis=1)
            v = tl.load(v_base + cols[:, None] * sv_l + dims[None, :], mask=cols[:, None] < L, other=0.0)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
            m_i = m_new
        out = tl.where(l_i[:, None] > 0, acc / l_i[:, None], 0.0)
        tl.store(o_ptr + row * so_n + head * so_h + rows_m[:, None] * so_m + dims[None, :],
                 out.to(o_ptr.dtype.element_ty), mask=rows_m[:, None] < M)
