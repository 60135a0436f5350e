"""The one-pass decode attention (kernels/decode_attention.py): which inputs take the Triton kernel,
and on a GPU the kernel against its reference on cache views with left padding and a masked
tail. The population engine decoding with it ("fused_decode") like one candidate at a time is
tested with every attention choice in test_randopt_decoder_fast.py."""

from __future__ import annotations

import pytest
import torch

from underpar.kernels import decode_attention as da


def inputs(n=6, H=12, M=3, D=64, L=150, cache=200, dtype=torch.float32, device="cpu"):
    """q, k/v as views of a longer cache, and a mask: row r's first valid slot 0, 70, 140, ...
    (whole 64-slot blocks ruled out), slots past `L - 10` ruled out (the bucket's tail)."""
    g = torch.Generator().manual_seed(0)
    q = torch.randn(n, H, M, D, generator=g).to(device, dtype)
    k_cache, v_cache = (torch.randn(n, H, cache, D, generator=g).to(device, dtype) for _ in range(2))
    first = torch.tensor([(70 * r) % (L - 20) for r in range(n)])
    slots = torch.arange(L)
    allowed = (slots[None, :] >= first[:, None]) & (slots[None, :] < L - 10)
    mask = torch.zeros(n, L).masked_fill_(~allowed, float("-inf")).to(device, dtype)[:, None, None, :]
    return q, k_cache[:, :, :L], v_cache[:, :, :L], mask


def test_the_kernel_takes_only_half_precision_cuda_decode_steps():
    q, k, v, mask = inputs()
    assert not da.kernel_applies(q, mask)  # a CPU tensor
    assert torch.equal(da.decode_attention(q, k, v, mask), da.decode_attention_reference(q, k, v, mask))
    if da.triton is None or not torch.cuda.is_available():
        return
    q, k, v, mask = inputs(dtype=torch.bfloat16, device="cuda")
    assert da.kernel_applies(q, mask)
    assert not da.kernel_applies(q.float(), mask.float())  # fp32: the reference's numbers
    assert not da.kernel_applies(q.expand(-1, -1, 17, -1), mask)  # a prefill's many query rows
    assert not da.kernel_applies(q, mask.expand(-1, -1, 3, -1))  # a per-query mask
    assert not da.kernel_applies(q[..., :48], mask)  # head size not a power of two


@pytest.mark.gpu
@pytest.mark.skipif(da.triton is None or not torch.cuda.is_available(), reason="needs CUDA and Triton")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("M", [1, 3])
def test_kernel_equals_reference_on_the_gpu(dtype, M):
    q, k, v, mask = inputs(M=M, dtype=dtype, device="cuda")
    assert da.kernel_applies(q, mask) and not k.is_contiguous()
    got = da.decode_attention(q, k, v, mask)
    want = da.decode_attention_reference(q.float(), k.float(), v.float(), mask.float())
    assert got.dtype == dtype and got.shape == q.shape
    torch.testing.assert_close(got.float(), want, atol=2e-2, rtol=2e-2)
    # whole blocks the mask rules out are not read: row 1's slots 0-63 (its first valid slot is 70)
    k[1, :, :64] = float("nan")
    v[1, :, :64] = float("nan")
    again = da.decode_attention(q, k, v, mask)
    assert torch.isfinite(again).all() and torch.equal(again, got)
    # skipped (row, head) pairs are zeros and read nothing; the others are unchanged
    skip = torch.zeros(q.shape[:2], dtype=torch.bool, device="cuda")
    skip[2, 1:4] = skip[4] = True
    k[2, 1:4] = v[4] = float("nan")
    skipped = da.decode_attention(q, k, v, mask, skip)
    assert torch.equal(skipped[~skip], got[~skip]) and not skipped[skip].any()
