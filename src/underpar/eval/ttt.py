"""Score-first test-time training: the validation stream in chunks; each chunk is scored
under the current weights (sliding windows, no gradients), and only then does the model train
on it, so no token is ever predicted by weights that have seen it (the challenge's legality
rule). The score is a val_bpb with the byte accounting of the plain evaluation, over the same
tokens; the model's weights are restored afterwards.

Default: PR #461/#549's recipe (SGD, lr 0.005, momentum 0.9, 3 epochs per 32,768-token
chunk, cosine decay across chunks, grad clip 1.0, every weight adapts, the last chunk is only
scored). `phases` > 0: the later records' phased schedule (eval/config.py). `params = "lora"`
trains rank-r adapters on the blocks' linears instead of the weights (A uniform in
+-1/sqrt(in), B zero, as the records' TTT LoRA), shared by the whole stream; the records'
per-document adapters are `scope = "document"` (eval/ttt_docs.py).
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext

import torch
import torch.distributed as dist
from torch import Tensor, nn

from underpar.data.tokenizer import ByteLUTs
from underpar.errors import ConfigError
from underpar.eval.bpb import BpbMeter
from underpar.eval.config import TTTConfig
from underpar.eval.sliding import OnScored, score_segments, scored_range, segments
from underpar.eval.ttt_docs import evaluate_ttt_documents

# (first target, last target) of the tokens one optimizer step trained on (this rank's share).
OnUpdate = Callable[[int, int], None]


@dataclasses.dataclass
class TTTResult:
    meter: BpbMeter  # summed over ranks
    chunks: int  # scope = document: documents
    updates: int  # optimizer steps
    trained_tokens: int  # target tokens trained on, all passes and epochs, all ranks
    seconds: float


@dataclasses.dataclass(frozen=True)
class Pass:
    """Training that follows the scoring of chunk `after`: chunks with their LR factors."""

    after: int
    chunks: tuple[tuple[int, float], ...]
    fresh_optimizer: bool


def chunk_ends(tokens: Tensor, last_target: int, cfg: TTTConfig) -> list[int]:
    """The last target of each chunk. Chunks hold `chunk_tokens` targets; with
    `respect_documents` a chunk ends just before the last document start (BOS) in its second
    half, so whole documents stay together."""
    bos = (tokens[: last_target + 1] == cfg.bos_id).nonzero().flatten()
    ends, lo = [], 1
    while lo <= last_target:
        hi = min(lo + cfg.chunk_tokens - 1, last_target)
        if cfg.respect_documents and hi < last_target:
            # A BOS at position p makes p - 1 a chunk end; take the last one in [lo + C/2, hi].
            at = int(torch.searchsorted(bos, torch.tensor(hi + 1), right=True)) - 1
            if at >= 0 and int(bos[at]) - 1 >= lo + cfg.chunk_tokens // 2:
                hi = int(bos[at]) - 1
        ends.append(hi)
        lo = hi + 1
    return ends


def _cosine(i: int, n: int, schedule: str) -> float:
    return 0.5 * (1.0 + math.cos(math.pi * i / n)) if schedule == "cosine" else 1.0


def plan(num_chunks: int, ends: list[int], cfg: TTTConfig) -> list[Pass]:
    """When the model trains, on which chunks, at which LR factors. The last chunk is never
    trained on (nothing is scored after it)."""
    if cfg.epochs == 0 or num_chunks < 2:
        return []
    if cfg.phases == 0:
        trained = num_chunks - 1
        return [Pass(m, ((m, _cosine(m, trained, cfg.lr_schedule)),), fresh_optimizer=m == 0) for m in range(trained)]
    prefix_end = cfg.phase_fraction * ends[-1]
    prefix = max(1, min(num_chunks - 1, sum(1 for e in ends if e <= prefix_end)))
    bounds = sorted({prefix * (g + 1) // cfg.phases for g in range(cfg.phases)} - {0})
    return [Pass(b - 1, tuple((m, _cosine(m, b, cfg.lr_schedule)) for m in range(b)), fresh_optimizer=True)
            for b in bounds]


class LoRA(nn.Module):
    """out + (x A^T) B^T on a linear, added by a forward hook (the model's code is untouched)."""

    def __init__(self, linear: nn.Linear, rank: int):
        super().__init__()
        bound = 1.0 / math.sqrt(linear.in_features)
        device = linear.weight.device
        self.A = nn.Parameter(torch.empty(rank, linear.in_features, device=device).uniform_(-bound, bound))
        self.B = nn.Parameter(torch.zeros(linear.out_features, rank, device=device))
        self.handle = linear.register_forward_hook(self.hook)

    def hook(self, module: nn.Module, inputs: tuple[Tensor, ...], output: Tensor) -> Tensor:
        x = inputs[0]
        return output + (x @ self.A.t().to(x.dtype)) @ self.B.t().to(x.dtype)


def attach_lora(model: nn.Module, rank: int) -> list[LoRA]:
    """Adapters on every linear inside `model.blocks` (attention and MLP projections)."""
    blocks = getattr(model, "blocks", None)
    if blocks is None:
        raise ConfigError("eval.ttt.params = 'lora' needs a model with .blocks; use eval.ttt.params = 'all'")
    return [LoRA(m, rank) for m in blocks.modules() if isinstance(m, nn.Linear)]


def optimizer_for(params: list[Tensor], cfg: TTTConfig) -> torch.optim.Optimizer:
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    return torch.optim.AdamW(params, lr=cfg.lr, betas=(cfg.momentum, 0.999), weight_decay=cfg.weight_decay)


def evaluate_ttt(
    model: nn.Module,
    val_tokens: Tensor,
    luts: ByteLUTs,
    cfg: TTTConfig,
    seq_len: int,
    stride: int,
    batch_seqs: int,
    autocast: Callable[[], AbstractContextManager] = nullcontext,
    rank: int = 0,
    world_size: int = 1,
    progress: Callable[[int], None] | None = None,
    on_scored: OnScored | None = None,
    on_update: OnUpdate | None = None,
) -> TTTResult:
    """Score-first TTT val_bpb of `model` (with `.logits(x)` and `model(x, y)` -> mean loss).
    Scoring uses windows of `seq_len` advanced by `stride` (0: seq_len); training uses
    sequences of `seq_len` from the chunk just scored. Every rank holds the whole model;
    gradients are averaged across ranks."""
    started = time.perf_counter()
    if cfg.scope == "document":
        meter, docs, steps, trained = evaluate_ttt_documents(model, val_tokens, luts, cfg, seq_len, autocast, rank,
                                                             world_size, progress, on_scored, on_update)
        return TTTResult(meter, docs, steps, trained, time.perf_counter() - started)
    device = luts.bytes_per_token.device
    stride = stride or seq_len
    last = scored_range(val_tokens.numel(), seq_len)
    ends = chunk_ends(val_tokens, last, cfg)
    passes = {p.after: p for p in plan(len(ends), ends, cfg)}
    saved = {k: v.detach().clone() for k, v in model.state_dict().items()}
    grad_flags = [p.requires_grad for p in model.parameters()]
    adapters = attach_lora(model, cfg.lora_rank) if cfg.params == "lora" else []
    if adapters:
        for p in model.parameters():
            p.requires_grad_(False)
    params = [p for a in adapters for p in a.parameters()] if adapters else list(model.parameters())
    meter, optimizer, updates, trained = BpbMeter(luts), None, 0, 0
    try:
        for m, hi in enumerate(ends):
            lo = ends[m - 1] + 1 if m else 1
            starts, seg_ends = segments(lo, hi, seq_len, stride)
            first, stop = len(seg_ends) * rank // world_size, len(seg_ends) * (rank + 1) // world_size
            model.eval()
            with torch.inference_mode(), autocast():  # scored before any update can use these tokens
                score_segments(model.logits, val_tokens, luts, starts[first:stop], seg_ends[first:stop], seq_len,
                               batch_seqs, meter, progress, on_scored)
            if (step := passes.get(m)) is None:
                continue
            if optimizer is None or step.fresh_optimizer:
                optimizer = optimizer_for(params, cfg)
            # The updates stay in eval mode: the loss is the plain cross-entropy, without the
            # training-only terms of model.loss (z-loss, token dropout, ...) the model trained with.
            for chunk, factor in step.chunks:
                for group in optimizer.param_groups:
                    group["lr"] = cfg.lr * factor
                chunk_lo = ends[chunk - 1] + 1 if chunk else 1
                n, t = _train_chunk(model, params, optimizer, val_tokens, chunk_lo, ends[chunk], seq_len, cfg,
                                    device, autocast, rank, world_size, on_update)
                updates, trained = updates + n, trained + t
    finally:
        for adapter in adapters:
            adapter.handle.remove()
        model.load_state_dict(saved)
        for p, flag in zip(model.parameters(), grad_flags):
            p.requires_grad_(flag)
        model.zero_grad(set_to_none=True)
        model.eval()
    return TTTResult(meter.all_reduce(), len(ends), updates, trained, time.perf_counter() - started)


def _train_chunk(model: nn.Module, params: list[Tensor], optimizer: torch.optim.Optimizer, tokens: Tensor,
                 lo: int, hi: int, seq_len: int, cfg: TTTConfig, device: torch.device,
                 autocast: Callable[[], AbstractContextManager], rank: int, world_size: int,
                 on_update: OnUpdate | None) -> tuple[int, int]:
    """`cfg.epochs` passes over the whole sequences of targets lo..hi (the tail short of a
    sequence is left out); each step takes `cfg.batch_seqs` sequences, split across ranks.
    Returns (optimizer steps, target tokens trained on)."""
    num_seqs = (hi - lo + 1) // seq_len
    distributed = world_size > 1 and dist.is_available() and dist.is_initialized()
    steps = 0
    for _ in range(cfg.epochs):
        for batch_first in range(0, num_seqs, cfg.batch_seqs):
            batch = min(cfg.batch_seqs, num_seqs - batch_first)
            mine_first = batch_first + batch * rank // world_size
            mine = batch_first + batch * (rank + 1) // world_size - mine_first
            optimizer.zero_grad(set_to_none=True)
            if mine:
                begin = lo - 1 + mine_first * seq_len  # the input token before the first target
                window = tokens[begin : begin + mine * seq_len + 1].to(device=device, dtype=torch.int64)
                with autocast():
                    loss = model(window[:-1].reshape(mine, seq_len), window[1:].reshape(mine, seq_len))
                (loss * (mine / batch)).backward()  # the mean over the whole step's sequences
                if on_update is not None:
                    on_update(begin + 1, begin + mine * seq_len)
            if distributed:
                for p in params:
                    if p.grad is None:
                        p.grad = torch.zeros_like(p)
                    dist.all_reduce(p.grad, op=dist.ReduceOp.SUM)
            if cfg.grad_clip_norm > 0:
                torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip_norm)
            optimizer.step()
            steps += 1
    return steps, cfg.epochs * num_seqs * seq_len
