"""Seeded sign perturbations for RandOpt: W(seed, sigma) = W0 + sigma * R(seed, i), R in {-1, +1},
rebuilt in one pass from a resident base copy (Triton on CUDA, a pure-torch reference elsewhere).

The sign stream (device-, dtype- and layout-independent; all arithmetic mod 2**32)::

    fmix32(x):  x ^= x >> 16; x *= 0x85EBCA6B; x ^= x >> 13; x *= 0xC2B2AE35; x ^= x >> 16
    seed32  = seed mod 2**32
    k_seed  = fmix32(seed32 + 0x9E3779B9)          # per seed (host)
    lo, hi  = i mod 2**32, i >> 32                  # i: 64-bit global element index
    k_hi    = fmix32(hi + 0x7F4A7C15)              # constant for 2**32 consecutive indices
    h       = fmix32(fmix32(lo ^ k_seed) ^ k_hi)
    R(seed, i) = +1 if h >> 31 == 1 else -1         # top bit: the best-mixed bit of a multiply

Same primitive as FlashOpt (murmur3 fmix32 over the seed and the index halves), in another
order: the seed enters before the high half, so no pair of indices is tied across all seeds
(hashing the whole index to 32 bits before the seed ties i to some i' >= 2**32 for every seed),
and a kernel pays two fmix32 per element (the high half's key is computed once per launch).
The global index is a running offset over the selected parameters in sorted-name order, each
tensor in row-major order, so the stream depends on neither devices nor parallel layout.

Math: out = (float32(base) + sigma32 * r).to(out.dtype) with sigma32 = sigma rounded to fp32
and r = +-1.0: the product is exact, so the result is one fp32 rounding then one round-to-
nearest-even cast, and the torch and Triton paths agree bit for bit (an FMA rounds the same).
Two seeds: ((float32(base) + sa * ra) + sb * rb), left to right, in both paths.

A model's parameters as one perturbation space (offsets, base copy, one-launch switching):
underpar.kernels.perturb_space.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Sequence

import torch
from torch import Tensor

from underpar.errors import ConfigError

try:  # the GPU fast path; everything else works without Triton
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the machine
    triton = tl = None

M32 = 0xFFFFFFFF
SEED_OFFSET = 0x9E3779B9
HI_OFFSET = 0x7F4A7C15
CHUNK = 1 << 22  # torch path: elements per pass (bounds int64 temporaries to ~32 MB each)
BLOCK = 4096
MAX_LAUNCH = 1 << 30  # keeps in-kernel offsets in int32
BACKENDS = ("auto", "torch", "triton")

Terms = Sequence[tuple[int, float]]


def fmix32(x: int) -> int:
    """The murmur3 32-bit finalizer on a Python int (host-side keys)."""
    x &= M32
    x ^= x >> 16
    x = (x * 0x85EBCA6B) & M32
    x ^= x >> 13
    x = (x * 0xC2B2AE35) & M32
    return x ^ (x >> 16)


def seed_key(seed: int) -> int:
    return fmix32((seed & M32) + SEED_OFFSET)


def hi_key(hi: int) -> int:  # hi = index >> 32
    return fmix32(hi + HI_OFFSET)


def to_f32(x: float) -> float:
    """`x` rounded to the nearest float32 (ties to even), as a Python float: what both paths add."""
    try:
        return struct.unpack("f", struct.pack("f", float(x)))[0]
    except OverflowError:  # rounds past the largest float32
        return math.copysign(math.inf, x)


# --------------------------------------------------------------------------- torch reference


def _mul32_(x: Tensor, c: int) -> Tensor:
    """x = x * c mod 2**32 in place, for int64 x in [0, 2**32): a full product would overflow
    int64, so multiply by the constant's 16-bit halves (each product < 2**48)."""
    high = x * (c >> 16)
    high &= 0xFFFF
    high <<= 16
    x *= c & 0xFFFF
    x += high
    x &= M32
    return x


def _fmix32_(x: Tensor) -> Tensor:
    x ^= x >> 16
    _mul32_(x, 0x85EBCA6B)
    x ^= x >> 13
    _mul32_(x, 0xC2B2AE35)
    x ^= x >> 16
    return x


def _sign_bits(seed: int, start: int, n: int, device) -> Tensor:
    """The top bit of h for indices [start, start + n), as int64 0/1."""
    idx = torch.arange(start, start + n, dtype=torch.int64, device=device)
    if start >> 32 == (start + n - 1) >> 32:
        k_hi: Tensor | int = hi_key(start >> 32)  # the common case: one high half
    else:
        k_hi = _fmix32_(((idx >> 32) + HI_OFFSET) & M32)
    idx &= M32
    idx ^= seed_key(seed)
    h = _fmix32_(idx)
    h ^= k_hi
    return _fmix32_(h) >> 31


def _check_range(start_index: int, numel: int) -> None:
    if start_index < 0 or numel < 0 or start_index + numel > 2**62:
        raise ValueError(f"index range [{start_index}, {start_index}+{numel}) is outside [0, 2**62)")


def signs_torch(seed: int, start_index: int, numel: int, device: torch.device | str = "cpu",
                dtype: torch.dtype = torch.float32) -> Tensor:
    """R(seed, i) for i in [start_index, start_index + numel) as +-1 in `dtype` (chunked)."""
    _check_range(start_index, numel)
    out = torch.empty(numel, dtype=dtype, device=device)
    for c0 in range(0, numel, CHUNK):
        c1 = min(numel, c0 + CHUNK)
        out[c0:c1] = _sign_bits(seed, start_index + c0, c1 - c0, device) * 2 - 1
    return out


def _flat_pair(base: Tensor, out: Tensor) -> tuple[Tensor, Tensor]:
    if base.numel() != out.numel():
        raise ValueError(f"base has {base.numel()} elements but out has {out.numel()}")
    if not out.is_contiguous() or out.device != base.device:
        raise ValueError("out must be contiguous and on base's device")
    return base.reshape(-1), out.view(-1)


def _torch_terms(base: Tensor, out: Tensor, terms: Terms, start_index: int) -> None:
    b, o = _flat_pair(base, out)
    _check_range(start_index, b.numel())
    terms = [(seed, to_f32(sigma)) for seed, sigma in terms]
    for c0 in range(0, b.numel(), CHUNK):
        c1 = min(b.numel(), c0 + CHUNK)
        acc = b[c0:c1].to(torch.float32, copy=True)
        for seed, sigma in terms:
            r = (_sign_bits(seed, start_index + c0, c1 - c0, b.device) * 2 - 1).to(torch.float32)
            acc += r.mul_(sigma)  # exact: sigma is an fp32 value and r is +-1
        o[c0:c1].copy_(acc)  # one round-to-nearest-even cast


def perturb_torch(base: Tensor, out: Tensor, seed: int, sigma: float, start_index: int) -> None:
    """out = (float32(base) + sigma * R(seed, start_index + k)).to(out.dtype), k row-major."""
    _torch_terms(base, out, [(seed, sigma)], start_index)


def perturb2_torch(base: Tensor, out: Tensor, seed_a: int, sigma_a: float, seed_b: int,
                   sigma_b: float, start_index: int) -> None:
    """out = ((float32(base) + sigma_a * R_a) + sigma_b * R_b).to(out.dtype)."""
    _torch_terms(base, out, [(seed_a, sigma_a), (seed_b, sigma_b)], start_index)


# --------------------------------------------------------------------------- Triton kernel

if triton is not None:

    @triton.jit
    def _fmix32_tl(h):
        h = h ^ (h >> 16)
        h = h * 0x85EBCA6B
        h = h ^ (h >> 13)
        h = h * 0xC2B2AE35
        h = h ^ (h >> 16)
        return h

    # The 32-bit keys arrive as signed int32 bit patterns (one compiled variant, never
    # specialized to a constant) and are reinterpreted as uint32.
    @triton.jit(do_not_specialize=["lo0", "k_hi", "key_a", "key_b"])
    def _perturb_kernel(base_ptr, out_ptr, n, lo0, k_hi, key_a, sigma_a, key_b, sigma_b,
                        TWO: tl.constexpr, BLOCK: tl.constexpr):
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)  # n < 2**30: int32 is enough
        mask = offs < n
        lo = lo0.to(tl.uint32, bitcast=True) + offs.to(tl.uint32, bitcast=True)
        k_hi_u = k_hi.to(tl.uint32, bitcast=True)
        h = _fmix32_tl(_fmix32_tl(lo ^ key_a.to(tl.uint32, bitcast=True)) ^ k_hi_u)
        r = (h >> 31).to(tl.float32) * 2.0 - 1.0
        val = tl.load(base_ptr + offs, mask=mask, other=0.0).to(tl.float32) + sigma_a * r
        if TWO:
            h2 = _fmix32_tl(_fmix32_tl(lo ^ key_b.to(tl.uint32, bitcast=True)) ^ k_hi_u)
            r2 = (h2 >> 31).to(tl.float32) * 2.0 - 1.0
            val = val + sigma_b * r2
        tl.store(out_ptr + offs, val.to(out_ptr.dtype.element_ty), mask=mask)


def triton_available() -> bool:
    return triton is not None


def _i32(x: int) -> int:
    """A uint32 value as the int32 with the same bits."""
    return x - (1 << 32) if x >= 1 << 31 else x


def _prepare(terms: Terms) -> tuple[int, float, int, float, bool]:
    """Kernel scalars for 1 or 2 (seed, sigma) terms: int32-pattern seed keys, fp32 sigmas."""
    if len(terms) not in (1, 2):
        raise ValueError(f"the Triton kernel combines 1 or 2 seeds, got {len(terms)}")
    (seed_a, sigma_a), (seed_b, sigma_b) = terms[0], terms[-1]
    return (_i32(seed_key(seed_a)), to_f32(sigma_a), _i32(seed_key(seed_b)), to_f32(sigma_b),
            len(terms) == 2)


def _launch(b: Tensor, o: Tensor, start_index: int, prepared: tuple) -> None:
    """Flat contiguous CUDA tensors: one launch per run of indices that share the high half
    (and is under 2**30 long, so in-kernel offsets fit int32)."""
    ka, sa, kb, sb, two = prepared
    n, pos = b.numel(), 0
    while pos < n:
        idx = start_index + pos
        seg = min(n - pos, MAX_LAUNCH, (1 << 32) - (idx & M32))
        bs, os_ = (b, o) if seg == n else (b[pos:pos + seg], o[pos:pos + seg])
        _perturb_kernel[(triton.cdiv(seg, BLOCK),)](
            bs, os_, seg, _i32(idx & M32), _i32(hi_key(idx >> 32)), ka, sa, kb, sb,
            TWO=two, BLOCK=BLOCK, num_warps=8)
        pos += seg


def _triton_terms(base: Tensor, out: Tensor, terms: Terms, start_index: int) -> None:
    if triton is None:
        raise ConfigError("backend 'triton' needs Triton, which is not installed; use backend=torch or auto")
    prepared = _prepare(terms)
    b, o = _flat_pair(base, out)
    if not b.is_cuda or not b.is_contiguous():
        raise ConfigError("backend 'triton' needs the model on a CUDA device; use backend=torch or auto")
    _check_range(start_index, b.numel())
    _launch(b, o, start_index, prepared)


def perturb_triton(base: Tensor, out: Tensor, seed: int, sigma: float, start_index: int) -> None:
    """The fused kernel: same contract as `perturb_torch`, no noise tensor, one pass."""
    _triton_terms(base, out, [(seed, sigma)], start_index)


def perturb2_triton(base: Tensor, out: Tensor, seed_a: int, sigma_a: float, seed_b: int,
                    sigma_b: float, start_index: int) -> None:
    """The fused two-seed kernel: same contract as `perturb2_torch`."""
    _triton_terms(base, out, [(seed_a, sigma_a), (seed_b, sigma_b)], start_index)


def check_backend(backend: str, device: torch.device | str) -> None:
    """Refuse, before any work, a backend that cannot run for a model on `device`."""
    if backend not in BACKENDS:
        raise ConfigError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    if backend == "triton" and triton is None:
        raise ConfigError("backend 'triton' needs Triton, which is not installed; use backend=torch or auto")
    if backend == "triton" and torch.device(device).type != "cuda":
        raise ConfigError("backend 'triton' needs the model on a CUDA device; use backend=torch or auto")


def resolve_backend(backend: str, tensor: Tensor, num_terms: int = 1) -> str:
    """'auto' = Triton for CUDA tensors when it is installed (and <= 2 seeds), else torch."""
    if backend not in BACKENDS:
        raise ConfigError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    if backend == "auto":
        return "triton" if triton is not None and tensor.is_cuda and num_terms <= 2 else "torch"
    return backend


def perturb(base: Tensor, out: Tensor, terms: Terms, start_index: int, backend: str = "auto") -> None:
    """out = base + sum(sigma * R(seed)) over `terms`, by the chosen backend."""
    if resolve_backend(backend, out, len(terms)) == "triton":
        _triton_terms(base, out, terms, start_index)
    else:
        _torch_terms(base, out, terms, start_index)
