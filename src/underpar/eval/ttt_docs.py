"""Per-document score-first LoRA TTT (eval.ttt.scope = "document"), as the records from PR
#1530 on do it: every document gets fresh rank-r adapters on the blocks' linears (the base
weights stay frozen), and its targets are taken in chunks of `doc_chunk_tokens`: a chunk is
scored under the adapters as they are, then the adapters take one optimizer step on that
chunk's loss, then the next chunk is scored. A window never reaches before its document's
BOS, so documents are independent and can be adapted side by side (a batch of documents,
each with its own adapters). The scored tokens and bytes are the plain evaluation's: document
j owns the targets after its BOS up to and including the next document's BOS.

Differences from the records: no adapter on the (tied) output head; documents are batched by
length in stream order per rank rather than claimed from a shared queue; no phases.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from underpar.data.tokenizer import ByteLUTs
from underpar.errors import ConfigError
from underpar.eval.bpb import BpbMeter
from underpar.eval.config import TTTConfig
from underpar.eval.sliding import OnScored, scored_range


class DocLoRA(nn.Module):
    """Adapters for a batch of documents on one linear: out[i] + (x[i] A[d]^T) B[d]^T for the
    document d that row i holds (`rows`, set before each forward)."""

    def __init__(self, linear: nn.Linear, docs: int, rank: int):
        super().__init__()
        self.bound = 1.0 / math.sqrt(linear.in_features)
        device = linear.weight.device
        self.A = nn.Parameter(torch.empty(docs, rank, linear.in_features, device=device))
        self.B = nn.Parameter(torch.empty(docs, linear.out_features, rank, device=device))
        self.rows: Tensor | None = None
        self.reset()
        self.handle = linear.register_forward_hook(self.hook)

    def reset(self) -> None:
        with torch.no_grad():
            self.A.uniform_(-self.bound, self.bound)
            self.B.zero_()

    def hook(self, module: nn.Module, inputs: tuple[Tensor, ...], output: Tensor) -> Tensor:
        x = inputs[0]
        a, b = self.A[self.rows].to(x.dtype), self.B[self.rows].to(x.dtype)
        return output + torch.bmm(torch.bmm(x, a.transpose(1, 2)), b.transpose(1, 2))


def documents(tokens: Tensor, last_target: int, bos_id: int) -> list[tuple[int, int]]:
    """(input start, last target) of each document: it starts at its BOS (or the stream start)
    and owns the targets up to and including the next BOS (the plain evaluation scores those
    too), cut at `last_target`."""
    starts = (tokens[:last_target] == bos_id).nonzero().flatten().tolist()
    if not starts or starts[0] != 0:
        starts = [0, *starts]
    ends = [*starts[1:], last_target]
    return [(s, e) for s, e in zip(starts, ends) if e > s]


def evaluate_ttt_documents(
    model: nn.Module,
    val_tokens: Tensor,
    luts: ByteLUTs,
    cfg: TTTConfig,
    seq_len: int,
    autocast: Callable[[], AbstractContextManager] = nullcontext,
    rank: int = 0,
    world_size: int = 1,
    progress: Callable[[int], None] | None = None,
    on_scored: OnScored | None = None,
    on_update: Callable[[int, int], None] | None = None,
) -> tuple[BpbMeter, int, int, int]:
    """Per-document LoRA TTT val_bpb of `model` (with `.logits(x)` and `.blocks`); windows of
    at most `seq_len` inputs. Returns (meter summed over ranks, documents, optimizer steps of
    this rank, target tokens this rank trained on). This rank adapts a contiguous slice of the
    length-sorted document batches."""
    from underpar.eval.ttt import optimizer_for

    blocks = getattr(model, "blocks", None)
    if blocks is None:
        raise ConfigError("eval.ttt.scope = 'document' needs a model with .blocks (LoRA on their linears)")
    docs = documents(val_tokens, scored_range(val_tokens.numel(), seq_len), cfg.bos_id)
    docs.sort(key=lambda d: d[1] - d[0], reverse=True)  # similar lengths share a batch: fewer idle rows
    batches = [docs[i : i + cfg.doc_batch] for i in range(0, len(docs), cfg.doc_batch)]
    mine = batches[len(batches) * rank // world_size : len(batches) * (rank + 1) // world_size]
    flags = [p.requires_grad for p in model.parameters()]
    for p in model.parameters():
        p.requires_grad_(False)
    adapters = [DocLoRA(m, cfg.doc_batch, cfg.lora_rank) for m in blocks.modules() if isinstance(m, nn.Linear)]
    meter, steps, trained = BpbMeter(luts), 0, 0
    model.eval()
    try:
        for batch in mine:
            for adapter in adapters:
                adapter.reset()
            optimizer = optimizer_for([p for a in adapters for p in a.parameters()], cfg)
            n, t = _adapt_batch(model, adapters, optimizer, batch, val_tokens, luts, cfg, seq_len, meter, autocast,
                                progress, on_scored, on_update)
            steps, trained = steps + n, trained + t
    finally:
        for adapter in adapters:
            adapter.handle.remove()
        for p, flag in zip(model.parameters(), flags):
            p.requires_grad_(flag)
    return meter.all_reduce(), len(docs), steps, trained


def _adapt_batch(model: nn.Module, adapters: list[DocLoRA], optimizer: torch.optim.Optimizer,
                 batch: list[tuple[int, int]], tokens: Tensor, luts: ByteLUTs, cfg: TTTConfig, seq_len: int,
                 meter: BpbMeter, autocast: Callable[[], AbstractContextManager], progress, on_scored,
                 on_update) -> tuple[int, int]:
    """Chunk k of every document of the batch that has one, scored then (if the document has
    another chunk) one step; k = 0, 1, ... Returns the optimizer steps taken."""
    device = luts.bytes_per_token.device
    size = cfg.doc_chunk_tokens
    chunks = [-(-(end - start) // size) for start, end in batch]
    steps = trained = 0
    for k in range(max(chunks)):
        rows = [j for j, n in enumerate(chunks) if k < n]
        spans = []  # (window start, first scored target, last target) per active document
        for j in rows:
            start, end = batch[j]
            lo, hi = start + 1 + k * size, min(start + (k + 1) * size, end)
            spans.append((max(start, hi - seq_len), lo, hi))
        ws, lo, hi = (torch.tensor(column) for column in zip(*spans))
        width = int((hi - ws).max())
        # Rows are right-padded with their last target: causal attention keeps padding out of
        # every scored prediction.
        window = tokens[torch.minimum(ws[:, None] + torch.arange(width + 1)[None], hi[:, None])]
        window = window.to(device=device, dtype=torch.int64)
        x_bt, y_bt = window[:, :-1], window[:, 1:]
        offsets = torch.arange(width)[None]
        mask = ((offsets >= (lo - ws - 1)[:, None]) & (offsets <= (hi - ws - 1)[:, None])).to(device)
        for adapter in adapters:
            adapter.rows = torch.tensor(rows, device=device)
        with autocast():
            logits = model.logits(x_bt)
        nll = F.cross_entropy(logits.float().flatten(0, 1), y_bt.flatten(), reduction="none").view_as(y_bt)
        meter.update(nll.detach()[mask], x_bt[mask], y_bt[mask])  # scored before the step below
        if on_scored is not None:
            positions = ws.to(device)[:, None] + 1 + torch.arange(width, device=device)[None]
            on_scored(positions[mask], logits.detach().float()[mask])
        if progress is not None:
            progress(int(mask.sum()))
        train = torch.tensor([k < chunks[j] - 1 for j in rows], device=device)
        if bool(train.any()):
            per_doc = (nll * mask).sum(1) / mask.sum(1)
            optimizer.zero_grad(set_to_none=True)
            (per_doc * train).sum().backward()
            optimizer.step()
            steps += 1
            trained += int(mask[train].sum())
            if on_update is not None:
                for (_, first, end), flag in zip(spans, train.tolist()):
                    if flag:
                        on_update(first, end)
    return steps, trained
