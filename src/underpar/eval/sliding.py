"""Sliding-window val_bpb (the records' EVAL_STRIDE): windows of seq_len advanced by a
stride, so each token is predicted with at least seq_len - stride tokens of context instead of
0..seq_len-1. Each token is scored exactly once, with the byte accounting of `evaluate_bpb`.

Targets are indexed by their position j in the token stream (token j predicted from tokens
< j). The scored targets are those the plain evaluation scores, 1..n*seq_len with
n = (N - 1) // seq_len, so plain and sliding scores divide the same bytes. They are cut into
segments ending at seq_len, seq_len + stride, seq_len + 2*stride, ... (and at the end of the
range); a segment [lo, hi] is scored by the one window that ends at hi, inputs
tokens[max(0, hi - seq_len) : hi]. With stride = seq_len the windows are exactly the plain
evaluation's. No window reaches past the last target it scores, so scoring any range
[lo, hi] reads no token after hi (what score-first test-time training relies on).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from underpar.data.tokenizer import ByteLUTs
from underpar.errors import ConfigError, DataError
from underpar.eval.bpb import BpbMeter, LogitsFn

# (target positions [n], logits [n, vocab]) of the tokens just scored, in stream order per batch.
OnScored = Callable[[Tensor, Tensor], None]


def scored_range(num_tokens: int, seq_len: int) -> int:
    """The last target the evaluation scores: n * seq_len, n = (num_tokens - 1) // seq_len
    (the plain evaluation drops the tail short of a window)."""
    if seq_len <= 0:
        raise ConfigError(f"seq_len must be positive, got {seq_len}")
    last = (num_tokens - 1) // seq_len * seq_len
    if last <= 0:
        raise DataError(
            f"validation set has {num_tokens} tokens, too few for one window of seq_len={seq_len} (+1); "
            "use more validation data or a shorter sequence length"
        )
    return last


def segments(lo: int, hi: int, seq_len: int, stride: int) -> tuple[Tensor, Tensor]:
    """The segments (first, last target; int64 tensors) that cover targets lo..hi (inclusive,
    lo >= 1), cut at seq_len + k * stride and at hi. Each segment is at most seq_len long."""
    if not 0 < stride <= seq_len:
        raise ConfigError(f"stride must lie in [1, seq_len = {seq_len}], got {stride}")
    if lo < 1 or hi < lo:
        raise ValueError(f"bad target range [{lo}, {hi}]")
    first_cut = seq_len if lo <= seq_len else seq_len + -(-(lo - seq_len) // stride) * stride
    cuts = torch.arange(first_cut, hi, stride, dtype=torch.int64)
    ends = torch.cat([cuts, torch.tensor([hi], dtype=torch.int64)])
    starts = torch.cat([torch.tensor([lo], dtype=torch.int64), ends[:-1] + 1])
    return starts, ends


def score_segments(
    logits_fn: LogitsFn,
    tokens: Tensor,
    luts: ByteLUTs,
    starts: Tensor,
    ends: Tensor,
    seq_len: int,
    batch_seqs: int,
    meter: BpbMeter,
    progress: Callable[[int], None] | None = None,
    on_scored: OnScored | None = None,
) -> None:
    """Score every segment [starts[i], ends[i]] with its window into `meter`, batching up to
    `batch_seqs` windows of equal length (only windows near the stream start are shorter)."""
    if batch_seqs <= 0:
        raise ConfigError(f"batch_seqs must be positive, got {batch_seqs}")
    device = luts.bytes_per_token.device
    window_starts = (ends - seq_len).clamp(min=0)
    lengths = ends - window_starts
    count, i = len(ends), 0
    while i < count:
        length = int(lengths[i])
        j = min(i + batch_seqs, count)
        other = (lengths[i:j] != length).nonzero()
        if len(other):  # cut the batch where the window length changes
            j = i + int(other[0])
        offsets = torch.arange(length + 1, dtype=torch.int64)
        index = window_starts[i:j, None] + offsets[None]
        window = tokens[index].to(device=device, dtype=torch.int64)
        x_bt, y_bt = window[:, :-1], window[:, 1:]
        # Row r predicts targets window_start + 1 ...; it scores from its segment's first target.
        first = (starts[i:j] - window_starts[i:j] - 1).to(device)
        mask = torch.arange(length, device=device)[None] >= first[:, None]
        logits_btv = logits_fn(x_bt)
        logits_nv = logits_btv.float().reshape(-1, logits_btv.size(-1))
        nll = F.cross_entropy(logits_nv, y_bt.reshape(-1), reduction="none")
        flat = mask.reshape(-1)
        meter.update(nll[flat], x_bt.reshape(-1)[flat], y_bt.reshape(-1)[flat])
        if on_scored is not None:
            positions = (window_starts[i:j, None].to(device) + 1 + torch.arange(length, device=device)[None])
            on_scored(positions.reshape(-1)[flat], logits_nv[flat])
        if progress is not None:
            progress(int(flat.sum()))
        i = j


def evaluate_sliding(
    logits_fn: LogitsFn,
    val_tokens: Tensor,
    luts: ByteLUTs,
    seq_len: int,
    stride: int,
    batch_seqs: int,
    rank: int = 0,
    world_size: int = 1,
    progress: Callable[[int], None] | None = None,
    on_scored: OnScored | None = None,
) -> BpbMeter:
    """val_bpb with windows of `seq_len` advanced by `stride`; this rank scores a contiguous
    slice of the segments. Returns the meter summed over all ranks. With stride = seq_len it
    equals `evaluate_bpb` (same windows, same batches)."""
    if val_tokens.dim() != 1:
        raise DataError(f"validation tokens must be 1-D, got shape {tuple(val_tokens.shape)}")
    starts, ends = segments(1, scored_range(val_tokens.numel(), seq_len), seq_len, stride)
    first, last = len(ends) * rank // world_size, len(ends) * (rank + 1) // world_size
    meter = BpbMeter(luts)
    with torch.inference_mode():
        score_segments(logits_fn, val_tokens, luts, starts[first:last], ends[first:last], seq_len, batch_seqs,
                       meter, progress, on_scored)
    return meter.all_reduce()
