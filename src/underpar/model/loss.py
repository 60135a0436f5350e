"""The training loss's optional terms (`model.loss.*`): the regularizers of the 131-run
experiment log (seed golf-experiment-log-131-runs.txt, Phase 1, N3/NF8, E1).

    z_loss           coef * mean over tokens of logsumexp(logits)^2        (#1: 1e-4)
    logit_penalty    coef * mean over tokens and vocab of logits^2         (#2: 1e-5)
    token_dropout    a fraction of the positions left out of the loss      (#3: 5%)
    embed_mixup      each sequence's embeddings interpolated with another's (#4: 0.1)
    label_smoothing  cross-entropy against smoothed targets                (E1: 0.1)
    head_diversity   coef * cosine similarity between attention heads      (N3, H1: 1e-4)

Why coefficients in one dataclass, not a registry of terms: the log switches them like its
environment variables (HEAD_DIVERSITY=1e-4), several at once (#6 stacks three), and the
terms are not of one kind (a penalty on the logits, one on the weights, a change to which
positions count, a change to the input), so one signature for all would be forced.

All default to 0 (off). They change only what `GPT.forward(x, y)` returns in training mode
(`model.train()`): `logits`, `token_losses` and the loss in eval mode stay the plain mean
cross-entropy, so every score is of the model alone (global score-first TTT adapts with
`model(x, y)` in training mode, so its updates do see the terms; its scores come from
`logits`). The logged train_loss includes the terms. The random draws (token dropout's
positions, mixup's partners) come from torch's generator, which the run seeds
(train.seed), checkpoints and restores after the compile warmup: a step's draws are the
same on a resume. Everything traces under torch.compile(fullgraph=True): no data-dependent
shapes (dropped positions are weighted 0, their number is fixed).
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor

from underpar.config import bounded
from underpar.errors import ConfigError
from underpar.kernels.softcap_ce import softcap_cross_entropy
from underpar.model.linear import rms_norm

if TYPE_CHECKING:
    from underpar.model.embeddings import EmbeddingsConfig
    from underpar.model.gpt import GPT


@dataclasses.dataclass
class LossConfig:
    # coef * mean logsumexp(capped logits)^2 (PaLM's z-loss; the log's #1 used 1e-4: +0.017).
    z_loss: float = bounded(0.0, 0.0)
    # coef * mean capped logit^2 over tokens and vocabulary (#2: 1e-5, neutral).
    logit_penalty: float = bounded(0.0, 0.0)
    # Fraction of each micro-batch's positions left out of the loss: exactly
    # round(fraction * tokens) of them, drawn anew every call (#3: 0.05, +0.003).
    token_dropout: float = bounded(0.0, 0.0, 0.9)
    # Weight of the partner in embedding mixup: x0 <- (1 - w) x0 + w x0[partner] and the
    # loss (1 - w) CE(own targets) + w CE(partner's targets), the partner another sequence
    # of the micro-batch at the same positions (so no future token leaks). The log (#4,
    # +0.004) says only "interpolate embedding vectors with random pairs, 0.1": that 0.1 is
    # read here as the fixed weight and the pairs as whole sequences; both are our reading.
    embed_mixup: float = bounded(0.0, 0.0, 0.5)
    # Label smoothing of the cross-entropy (E1: 0.1 on the best config, +0.059).
    label_smoothing: float = bounded(0.0, 0.0, 1.0)
    # coef * mean squared cosine similarity between the attention heads' query projections
    # (each head's rows of c_q, flattened), averaged over head pairs and blocks: 0 for
    # orthogonal heads. The log's "quorum sensing" (N3, NF8, H1: 1e-4; 1e-3 too strong in
    # C13) names no formula; the squared cosine of the query weights is our reading.
    head_diversity: float = bounded(0.0, 0.0)

    def active(self) -> bool:
        """Whether any term is on (off: the training loss is the plain mean cross-entropy)."""
        return any(getattr(self, f.name) > 0 for f in dataclasses.fields(self))

    def check_with(self, embeddings: EmbeddingsConfig) -> None:
        """The fused loss kernel never stores the capped logits these terms need."""
        needs_logits = [n for n in ("z_loss", "logit_penalty", "label_smoothing") if getattr(self, n) > 0]
        if embeddings.fused_ce and needs_logits:
            raise ConfigError(
                f"model.loss.{needs_logits[0]} needs the capped logits, which model.embeddings.fused_ce "
                f"never stores; set model.embeddings.fused_ce=false (token_dropout, embed_mixup and "
                f"head_diversity work with it)"
            )


def z_loss(logits: Tensor) -> Tensor:
    """logsumexp(logits)^2 per token [...]: 0 when the softmax normalizer Z is 1."""
    return torch.logsumexp(logits.float(), dim=-1).square()


def logit_penalty(logits: Tensor) -> Tensor:
    """The mean squared logit per token [...]."""
    return logits.float().square().mean(dim=-1)


def num_dropped(num_tokens: int, fraction: float) -> int:
    """How many of `num_tokens` positions token dropout leaves out: round(fraction * n),
    never all of them."""
    return min(round(fraction * num_tokens), num_tokens - 1)


def token_keep_mask(shape: torch.Size, fraction: float, device: torch.device) -> Tensor:
    """1.0 at kept positions, 0.0 at exactly `num_dropped` positions drawn uniformly from
    torch's generator (the largest of one uniform draw per position), float32 of `shape`."""
    numel = shape.numel()
    scores = torch.rand(numel, device=device)
    dropped = scores.topk(num_dropped(numel, fraction)).indices
    keep = torch.ones(numel, device=device).index_fill(0, dropped, 0.0)
    return keep.view(shape)


def mixup_partners(batch: int, device: torch.device) -> Tensor:
    """Each sequence's mixup partner [batch]: the one `shift` rows on (cyclically), `shift`
    drawn uniformly from 1..batch-1, so no sequence is its own partner (batch >= 2)."""
    shift = torch.randint(1, batch, (1,), device=device)
    return (torch.arange(batch, device=device) + shift) % batch


def head_similarity(weight: Tensor, num_heads: int) -> Tensor:
    """Mean over head pairs of the squared cosine similarity between heads' projections:
    `weight` [num_heads * head_dim, in_dim] holds each head's rows in turn (c_q's layout).
    0 when the heads' flattened rows are orthogonal, 1 when they are all parallel."""
    # In fp32 even under bf16 autocast: random heads' cosines are ~1/sqrt(rows), far below
    # bf16's resolution next to the diagonal's 1s.
    with torch.autocast(weight.device.type, enabled=False):
        heads = F.normalize(weight.float().reshape(num_heads, -1), dim=-1)
        cos = heads @ heads.T
    diagonal = torch.eye(num_heads, dtype=torch.bool, device=weight.device)
    return cos.square().masked_fill(diagonal, 0.0).sum() / (num_heads * (num_heads - 1))


def head_diversity(model: GPT) -> Tensor:
    """`head_similarity` of every block's query projection, averaged over blocks (0 for a
    model with one head per block)."""
    terms = [head_similarity(b.attn.c_q.weight, b.attn.num_heads) for b in model.blocks if b.attn.num_heads > 1]
    if not terms:
        return model.skip_weights.new_zeros(())
    return torch.stack(terms).mean()


def _hidden(model: GPT, x0: Tensor) -> Tensor:
    """GPT.hidden from given block inputs x0 (mixup changes them)."""
    return rms_norm(model.run_blocks(x0))


def training_loss(model: GPT, input_ids: Tensor, target_ids: Tensor) -> Tensor:
    """The training loss with the terms `model.cfg.loss` switches on: the mean over kept
    positions of cross-entropy (label-smoothed, mixed for mixup) + z_loss + logit_penalty,
    plus head_diversity."""
    cfg, emb = model.cfg.loss, model.cfg.embeddings
    batch = input_ids.size(0)
    mix = cfg.embed_mixup if batch > 1 else 0.0  # one sequence has no partner to mix with
    if mix > 0:
        partners = mixup_partners(batch, input_ids.device)
        x0 = model.embed(input_ids)
        hidden = _hidden(model, (1.0 - mix) * x0 + mix * x0[partners])
    else:
        hidden = model.hidden(input_ids)
    target_sets = [(1.0, target_ids)] if mix == 0 else [(1.0 - mix, target_ids), (mix, target_ids[partners])]
    if emb.fused_ce:  # check_with allows only the terms that need no logits here
        head = model.head(hidden)
        per_token = sum(w * softcap_cross_entropy(head, t, emb.logit_softcap, reduction="none") for w, t in target_sets)
    else:
        logits = model.capped_logits(hidden).float()
        flat = logits.flatten(0, 1)
        per_token = sum(
            w * F.cross_entropy(flat, t.flatten(), reduction="none", label_smoothing=cfg.label_smoothing).view_as(t)
            for w, t in target_sets
        )
        if cfg.z_loss > 0:
            per_token = per_token + cfg.z_loss * z_loss(logits)
        if cfg.logit_penalty > 0:
            per_token = per_token + cfg.logit_penalty * logit_penalty(logits)
    if cfg.token_dropout > 0:
        keep = token_keep_mask(target_ids.shape, cfg.token_dropout, target_ids.device)
        kept = target_ids.numel() - num_dropped(target_ids.numel(), cfg.token_dropout)
        loss = (per_token * keep).sum() / kept
    else:
        loss = per_token.mean()
    if cfg.head_diversity > 0:
        loss = loss + cfg.head_diversity * head_diversity(model)
    return loss
