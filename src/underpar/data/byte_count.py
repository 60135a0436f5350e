"""Byte accounting of token streams: how many UTF-8 bytes each target token adds to the text,
from the tokenizer's byte look-up tables. The denominator of bits per byte (the prepared
manifest's scored bytes and every bpb evaluation count bytes with this one function)."""

from __future__ import annotations

import torch
from torch import Tensor

from underpar.data.tokenizer import ByteLUTs


def target_bytes(prev_ids: Tensor, tgt_ids: Tensor, luts: ByteLUTs) -> Tensor:
    """UTF-8 bytes each target token adds: its piece's bytes, plus one for a leading space
    unless the previous token is a boundary (BOS etc.), where the space is not in the text."""
    space = luts.has_leading_space[tgt_ids] & ~luts.is_boundary[prev_ids]
    return luts.bytes_per_token[tgt_ids].to(torch.int64) + space.to(torch.int64)
