"""Bytes for quantized values: sub-byte packing of signed intN codes and byte-plane shuffling.

Two layouts for the integer codes of a quantized tensor (`quant.packings` lists which the
export tries, per tensor group, keeping the smaller after compression):
  "int8"  one code per byte (what the records ship: int6 codes in int8, left to brotli);
  "bits"  exactly `bits` bits per code: int6 as 4 codes in 3 bytes, int4 as 2 per byte,
          every other width 2..8 through a generic bit stream (int5: 8 codes in 5 bytes).
Codes are stored offset by 2**(bits-1), so -2**(bits-1) .. 2**(bits-1)-1 map to 0 .. 2**bits-1.

Byte-plane shuffling writes byte k of every element before byte k+1 of any (stride =
element size), so the slowly varying high bytes of fp16 scales sit together for the
compressor; it changes no byte, only their order.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from underpar.errors import ArtifactError

LAYOUTS = ("int8", "bits")
MIN_BITS, MAX_BITS = 2, 8


def code_range(bits: int) -> tuple[int, int]:
    """The signed codes a `bits`-wide field holds: (-2**(bits-1), 2**(bits-1) - 1)."""
    if not MIN_BITS <= bits <= MAX_BITS:
        raise ValueError(f"bits must lie in [{MIN_BITS}, {MAX_BITS}], got {bits}")
    return -(1 << (bits - 1)), (1 << (bits - 1)) - 1


def packed_size(numel: int, bits: int, layout: str) -> int:
    """Bytes that `numel` codes take in `layout`."""
    return numel if layout == "int8" else (numel * bits + 7) // 8


def _unsigned(codes: Tensor, bits: int) -> np.ndarray:
    lo, hi = code_range(bits)
    if codes.dtype != torch.int8:
        raise ValueError(f"codes must be torch.int8, got {codes.dtype}")
    flat = codes.detach().cpu().contiguous().view(-1)
    if flat.numel() and (int(flat.min()) < lo or int(flat.max()) > hi):
        raise ValueError(f"codes outside the int{bits} range [{lo}, {hi}]")
    return (flat.numpy().astype(np.int16) - lo).astype(np.uint8)


def pack(codes: Tensor, bits: int, layout: str = "bits") -> bytes:
    """The codes (torch.int8, each within int`bits`) as bytes in `layout`."""
    u = _unsigned(codes, bits)
    if layout == "int8":
        return u.tobytes()
    if layout != "bits":
        raise ValueError(f"unknown layout {layout!r}; valid: {', '.join(LAYOUTS)}")
    n = u.size
    if bits == 8:
        return u.tobytes()
    if bits == 4:
        u = np.concatenate([u, np.zeros(n % 2, np.uint8)]).reshape(-1, 2)
        return (u[:, 0] | (u[:, 1] << 4)).astype(np.uint8).tobytes()
    if bits == 6:
        u = np.concatenate([u, np.zeros(-n % 4, np.uint8)]).reshape(-1, 4).astype(np.uint32)
        word = u[:, 0] | (u[:, 1] << 6) | (u[:, 2] << 12) | (u[:, 3] << 18)  # 24 bits
        out = np.stack([word & 0xFF, (word >> 8) & 0xFF, (word >> 16) & 0xFF], axis=1)
        return out.astype(np.uint8).tobytes()[: packed_size(n, 6, "bits")]
    # Any other width: the low `bits` bits of each code, least significant first, as one stream.
    bit_rows = np.unpackbits(u[:, None], axis=1, bitorder="little")[:, :bits]
    return np.packbits(bit_rows.reshape(-1), bitorder="little").tobytes()


def unpack(data: bytes, numel: int, bits: int, layout: str = "bits") -> Tensor:
    """The int8 codes `pack` wrote (a 1-D tensor of `numel`); wrong lengths are an ArtifactError."""
    lo, _ = code_range(bits)
    expected = packed_size(numel, bits, layout)
    if len(data) != expected:
        raise ArtifactError(f"packed int{bits} ({layout}) data is {len(data)} bytes, expected {expected} for {numel} codes")
    raw = np.frombuffer(data, dtype=np.uint8)
    if layout == "int8" or bits == 8:
        u = raw
    elif bits == 4:
        u = np.stack([raw & 0x0F, raw >> 4], axis=1).reshape(-1)[:numel]
    elif bits == 6:
        padded = np.concatenate([raw, np.zeros(-raw.size % 3, np.uint8)]).reshape(-1, 3).astype(np.uint32)
        word = padded[:, 0] | (padded[:, 1] << 8) | (padded[:, 2] << 16)
        u = np.stack([(word >> s) & 0x3F for s in (0, 6, 12, 18)], axis=1).reshape(-1)[:numel]
    else:
        stream = np.unpackbits(raw, bitorder="little")[: numel * bits].reshape(numel, bits)
        u = np.packbits(stream, axis=1, bitorder="little").reshape(-1)
    codes = u.astype(np.int16) + lo
    return torch.from_numpy(codes.astype(np.int8))


def shuffle(data: bytes, stride: int) -> bytes:
    """Byte planes of `stride`-byte elements: all first bytes, then all second bytes, ..."""
    if stride <= 1 or not data:
        return data
    if len(data) % stride:
        raise ValueError(f"{len(data)} bytes are not a whole number of {stride}-byte elements")
    return np.frombuffer(data, np.uint8).reshape(-1, stride).T.tobytes()


def unshuffle(data: bytes, stride: int) -> bytes:
    """The inverse of `shuffle`."""
    if stride <= 1 or not data:
        return data
    if len(data) % stride:
        raise ArtifactError(f"{len(data)} shuffled bytes are not a whole number of {stride}-byte elements")
    return np.frombuffer(data, np.uint8).reshape(stride, -1).T.tobytes()
