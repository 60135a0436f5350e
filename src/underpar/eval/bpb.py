"""Exact validation bits-per-byte, as the Parameter Golf baseline scores it: summed token NLL
in nats over the UTF-8 bytes those tokens stand for, accumulated in float64."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor

from underpar.data.byte_count import target_bytes
from underpar.data.tokenizer import ByteLUTs
from underpar.errors import ConfigError, DataError

LogitsFn = Callable[[Tensor], Tensor]  # x_bt (int64) -> logits_btv


class BpbMeter:
    """Sums of NLL (nats), target bytes and token count, in float64 on the LUTs' device."""

    def __init__(self, luts: ByteLUTs) -> None:
        self.luts = luts
        # One tensor [nll_sum, byte_sum, token_count] so all_reduce is a single call.
        self.sums = torch.zeros(3, dtype=torch.float64, device=luts.bytes_per_token.device)

    def update(self, nll_per_token: Tensor, prev_ids: Tensor, tgt_ids: Tensor) -> None:
        if nll_per_token.shape != tgt_ids.shape or prev_ids.shape != tgt_ids.shape:
            raise ValueError(
                f"shapes differ: nll {tuple(nll_per_token.shape)}, prev {tuple(prev_ids.shape)}, "
                f"tgt {tuple(tgt_ids.shape)}"
            )
        device = self.sums.device
        nll_sum = nll_per_token.detach().to(device=device, dtype=torch.float64).sum()
        byte_sum = target_bytes(prev_ids, tgt_ids, self.luts).sum()
        byte_sum = byte_sum.to(device=device, dtype=torch.float64)
        count = torch.tensor(float(tgt_ids.numel()), dtype=torch.float64, device=device)
        self.sums += torch.stack([nll_sum, byte_sum, count])

    def add(self, other: BpbMeter) -> None:
        """Fold in another meter's sums (e.g. a simulated rank)."""
        self.sums += other.sums.to(self.sums.device)

    def all_reduce(self) -> BpbMeter:
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(self.sums, op=dist.ReduceOp.SUM)
        return self

    @property
    def nll_sum(self) -> float:
        return float(self.sums[0].item())

    @property
    def bytes(self) -> int:
        return int(self.sums[1].item())

    @property
    def tokens(self) -> int:
        return int(self.sums[2].item())

    @property
    def loss(self) -> float:
        """Mean NLL in nats per token."""
        if self.tokens == 0:
            raise DataError("no tokens were scored; the validation set is empty or too short")
        return self.nll_sum / self.tokens

    @property
    def bpb(self) -> float:
        if self.bytes == 0:
            raise DataError(
                "the scored tokens cover 0 bytes (empty validation set, or only control tokens); "
                "check the validation shards and the tokenizer they were made with"
            )
        return (self.nll_sum / math.log(2.0)) / self.bytes


def evaluate_bpb(
    logits_fn: LogitsFn,
    val_tokens: Tensor,
    luts: ByteLUTs,
    seq_len: int,
    batch_seqs: int,
    rank: int = 0,
    world_size: int = 1,
    progress: Callable[[int], None] | None = None,
) -> BpbMeter:
    """Score `val_tokens` in non-overlapping windows of `seq_len` (token t+1 predicted from
    tokens <= t within its window); this rank takes a contiguous slice of the windows.

    As the baseline, only the first ((N - 1) // seq_len) windows are scored; the tail that
    does not fill a window is dropped. Returns the meter summed over all ranks.
    """
    if seq_len <= 0 or batch_seqs <= 0:
        raise ConfigError(f"seq_len and batch_seqs must be positive, got {seq_len} and {batch_seqs}")
    if val_tokens.dim() != 1:
        raise DataError(f"validation tokens must be 1-D, got shape {tuple(val_tokens.shape)}")
    total_seqs = (val_tokens.numel() - 1) // seq_len
    if total_seqs <= 0:
        raise DataError(
            f"validation set has {val_tokens.numel()} tokens, too few for one window of "
            f"seq_len={seq_len} (+1); use more validation data or a shorter sequence length"
        )
    seq_start = total_seqs * rank // world_size
    seq_end = total_seqs * (rank + 1) // world_size
    device = luts.bytes_per_token.device
    meter = BpbMeter(luts)
    with torch.inference_mode():
        for first in range(seq_start, seq_end, batch_seqs):
            last = min(first + batch_seqs, seq_end)
            window = val_tokens[first * seq_len : last * seq_len + 1]
            window = window.to(device=device, dtype=torch.int64)
            x_bt = window[:-1].reshape(-1, seq_len)
            y_bt = window[1:].reshape(-1, seq_len)
            logits_btv = logits_fn(x_bt)
            logits_nv = logits_btv.float().reshape(-1, logits_btv.size(-1))
            nll = F.cross_entropy(logits_nv, y_bt.reshape(-1), reduction="none")
            meter.update(nll, x_bt.reshape(-1), y_bt.reshape(-1))
            if progress is not None:
                progress(y_bt.numel())
    return meter.all_reduce()


def count_tokens(tokens: Tensor, vocab_size: int) -> Tensor:
    """How often each id occurs (int64, length vocab_size)."""
    flat = tokens.reshape(-1).to(torch.int64)
    if flat.numel() and (int(flat.min()) < 0 or int(flat.max()) >= vocab_size):
        raise DataError(
            f"token ids span [{int(flat.min())}, {int(flat.max())}], outside a vocabulary of "
            f"{vocab_size}; the shards were made with a different tokenizer"
        )
    return torch.bincount(flat, minlength=vocab_size)


def uniform_logits_fn(vocab_size: int) -> LogitsFn:
    """A model that gives every token probability 1/V: bpb = log2(V) * tokens / bytes."""

    def logits_fn(x_bt: Tensor) -> Tensor:
        return torch.zeros(vocab_size, device=x_bt.device).expand(*x_bt.shape, vocab_size)

    return logits_fn


def unigram_logits_fn(train_token_counts: Tensor, alpha: float = 1.0) -> LogitsFn:
    """A context-free model: add-alpha smoothed token frequencies from the training data."""
    counts = train_token_counts.to(torch.float64)
    if alpha < 0 or (alpha == 0 and bool((counts == 0).any())):
        raise DataError(f"alpha={alpha} leaves some tokens with probability 0; use alpha > 0")
    smoothed = counts + alpha
    log_probs = (smoothed / smoothed.sum()).log().to(torch.float32)

    def logits_fn(x_bt: Tensor) -> Tensor:
        return log_probs.to(x_bt.device).expand(*x_bt.shape, log_probs.numel())

    return logits_fn
