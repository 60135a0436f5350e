"""The Parameter Golf baseline GPT, built from a validated `GPTConfig` (model/config.py).

Defaults reproduce the reference `train_gpt.py` exactly (17,059,912 parameters); parameter
names match its state-dict keys, and modules are created in its order so a seed gives the
same initial weights.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from underpar.config import validate
from underpar.errors import ConfigError
from underpar.kernels.softcap_ce import softcap_cross_entropy
from underpar.model.block import Block, layer_ln_scale
from underpar.model.config import GPTConfig
from underpar.model.dynamic import draw_layer_gates, mirror_batch
from underpar.model.embeddings import BigramHash, SmearGate, softcap
from underpar.model.linear import CastedLinear, rms_norm
from underpar.model.loss import training_loss
from underpar.model.residual import UNetLayout, run_unet, unet_layout
from underpar.stages import Switch


class GPT(nn.Module):
    """Token embedding (+ BigramHash, SmearGate) -> U-Net of blocks (model/residual.py), run
    in the order depth recurrence gives (model/recurrence.py) or model.structure's sharing
    and growing give (model/dynamic.py) -> final RMS norm -> (tied) head -> softcap."""

    def __init__(self, cfg: GPTConfig):
        super().__init__()
        validate(cfg)
        self.cfg = cfg
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.model_dim)
        # The U-Net over the blocks in the order they run: plain, and with depth recurrence
        # (model/recurrence.py; the same layout without it). A recurrence switched on during
        # training starts on the plain one: `looping` (a Python bool, so each value is its own
        # compiled graph) says which runs; `stage_switches` hands the switch to the trainer.
        recurrence, structure = cfg.recurrence, cfg.structure
        plain = structure.order(cfg.num_layers)  # every layer once (shared groups repeat a block)
        self.plain_layout = unet_layout(plain, cfg.residual)
        self.layout = self.plain_layout
        if structure.share_group == 1:
            self.layout = unet_layout(recurrence.order(cfg.num_layers), cfg.residual)
        self.looping = recurrence.stage_at() is None
        # Progressive growing (model/dynamic.py): the first `depth` layers run, one layout and
        # one compiled graph per depth; `depth` is a Python int its training stages set.
        self.start_depth = structure.grow.start_depth(cfg.num_layers)
        self.depth = self.start_depth
        self.grown_layouts = [unet_layout(plain[:n], cfg.residual) for n in range(self.start_depth, cfg.num_layers)]
        self._grown = [False] * len(structure.grow.schedule(cfg.num_layers))  # which layer-adding stages are on
        self.num_encoder_layers = self.layout.num_encoder_layers
        self.num_decoder_layers = self.layout.num_decoder_layers
        self.num_skips = max(layout.num_skips for layout in [self.layout, self.plain_layout, *self.grown_layouts])
        self.skip_weights = nn.Parameter(torch.ones(self.num_skips, cfg.model_dim))
        first_layers = range(0, cfg.num_layers, structure.share_group)  # each block's first layer
        self.blocks = nn.ModuleList(self._block(cfg, layer) for layer in first_layers)
        for block, layer in zip(self.blocks, first_layers):
            block.attn.xsa = cfg.attention.xsa_at(layer)
            if structure.prune_heads_to:
                block.attn.allow_pruning()
        if cfg.dropout > 0:
            self.set_dropout(cfg.dropout)
        # Layer dropout: one 0/1 gate per position, redrawn by `begin_step` (not saved).
        gates = torch.ones(len(self.layout.order)) if structure.layer_dropout > 0 else None
        self.register_buffer("layer_gates", gates, persistent=False)
        self.lm_head = None
        if not cfg.embeddings.tied:
            self.lm_head = CastedLinear(cfg.model_dim, cfg.vocab_size, zero_init=True)
        # Last, after every other random init, as in the reference (same RNG order).
        if cfg.embeddings.tied:
            nn.init.normal_(self.tok_emb.weight, mean=0.0, std=cfg.embeddings.tied_init_std)
        # After the reference's whole init, so switching these on leaves the other weights a
        # seed gives as they were.
        emb = cfg.embeddings
        self.bigram = None
        if emb.bigram_buckets > 0:
            self.bigram = BigramHash(emb.bigram_buckets, emb.bigram_dim, cfg.model_dim, emb.bos_id)
        self.smear_gate = SmearGate(emb.smear_window, emb.bos_id) if emb.smear_gate else None
        self.adapters = recurrence.adapters(cfg.num_layers, cfg.model_dim)

    @staticmethod
    def _block(cfg: GPTConfig, layer: int) -> Block:
        res = cfg.residual
        return Block(
            cfg.model_dim,
            cfg.attention,
            cfg.mlp,
            ln_scale=layer_ln_scale(layer) if res.layerwise_ln_scale else 1.0,
            parallel=0 <= res.parallel_start <= layer,
            two_lanes=0 <= res.two_lane_start <= layer,
            attention_passes=cfg.structure.attention_passes,
            dropout=cfg.dropout > 0,
        )

    def stage_switches(self) -> list[Switch]:
        """The structure this model changes during training (tracks/stages.py): depth
        recurrence, progressive growing (one switch per added layer), head pruning."""
        switches = []
        at = self.cfg.recurrence.stage_at()
        if at is not None:
            switches.append(Switch(at, "depth recurrence", self._set_looping))
        for k, point in enumerate(self.cfg.structure.grow.schedule(self.cfg.num_layers)):
            switches.append(Switch(point, f"layer {self.start_depth + k + 1} of {self.cfg.num_layers}",
                                   lambda on, k=k: self._set_grown(k, on)))
        structure = self.cfg.structure
        if structure.prune_heads_to:
            switches.append(Switch(structure.prune_at, f"heads pruned to {structure.prune_heads_to}", self._set_pruned))
        return switches

    def _set_looping(self, on: bool) -> None:
        self.looping = on

    def _set_grown(self, k: int, on: bool) -> None:
        self._grown[k] = on
        self.depth = self.start_depth + sum(self._grown)

    def _set_pruned(self, on: bool) -> None:
        for block in self.blocks:
            block.attn.prune_heads(self.cfg.structure.prune_heads_to if on else None)

    def set_dropout(self, p: float) -> None:
        """The rate model.dropout runs at from now on (optim.weight_dynamics = metamorphosis
        decays it): a fill of the blocks' rate buffers, which the compiled graph reads."""
        if self.cfg.dropout == 0:
            raise ConfigError("this model has no dropout (model.dropout = 0); set model.dropout to its starting rate")
        if not 0.0 <= p < 1.0:
            raise ConfigError(f"a dropout rate must be in [0, 1); got {p}")
        for block in self.blocks:
            block.dropout_rate.fill_(p)

    def begin_step(self, seed: int, step: int) -> None:
        """Before optimizer step `step` (1-based) of a run seeded `seed`: redraw the layer
        dropout gates, a function of (seed, step) (model/dynamic.py); nothing otherwise."""
        if self.layer_gates is not None:
            p = self.cfg.structure.layer_dropout
            self.layer_gates.copy_(draw_layer_gates(seed, step, self.layer_gates.numel(), p))

    def leaves_blocks_idle(self) -> bool:
        """Whether some blocks get no gradient in some steps (progressive growing): DDP must
        then look for unused parameters."""
        return bool(self.grown_layouts)

    def lr_scale(self, param_name: str) -> float:
        """The factor on a parameter's base learning rate (optim/groups.py): PR #38's shared
        blocks train at matrix_lr / sqrt(loops)."""
        return self.cfg.recurrence.lr_scale() if param_name.startswith("blocks.") else 1.0

    def embed(self, input_ids: Tensor) -> Tensor:
        """The normed input x0 of the blocks [B, T, model_dim]."""
        x = self.tok_emb(input_ids)
        if self.bigram is not None:
            x = x + self.bigram(input_ids)
        if self.smear_gate is not None:
            x = self.smear_gate(x, input_ids)
        return rms_norm(x)

    def hidden(self, input_ids: Tensor) -> Tensor:
        """Final normed hidden states [B, T, model_dim]."""
        x0 = self.embed(input_ids)
        return rms_norm(self.run_blocks(x0))

    def current_layout(self) -> UNetLayout:
        """The U-Net of the current training stage (recurrence on or off, grown depth)."""
        if self.depth < self.cfg.num_layers:
            return self.grown_layouts[self.depth - self.start_depth]
        return self.layout if self.looping else self.plain_layout

    def run_blocks(self, x0: Tensor) -> Tensor:
        """The blocks' output (before the final norm) from their input x0 [B, T, model_dim],
        in the current stage's layout; layer dropout's gates apply in training mode only."""
        gates = self.layer_gates if self.training else None
        return run_unet(self.blocks, self.skip_weights, self.current_layout(), x0, x0=x0, adapters=self.adapters,
                        gates=gates)

    def head(self, hidden: Tensor) -> Tensor:
        """Logits before the softcap, in the compute dtype (bf16 under autocast)."""
        if self.lm_head is None:
            return F.linear(hidden, self.tok_emb.weight)
        return self.lm_head(hidden)

    def capped_logits(self, hidden: Tensor) -> Tensor:
        """Softcapped logits in the compute dtype."""
        return softcap(self.head(hidden), self.cfg.embeddings.logit_softcap)

    def logits(self, input_ids: Tensor) -> Tensor:
        """Next-token logits [B, T, vocab], float32."""
        return self.capped_logits(self.hidden(input_ids)).float()

    def token_losses(self, input_ids: Tensor, target_ids: Tensor) -> Tensor:
        """Per-token cross-entropy in nats [B, T], float32 (for bpb and sliding-window eval)."""
        logits = self.logits(input_ids)
        losses = F.cross_entropy(logits.flatten(0, 1), target_ids.flatten(), reduction="none")
        return losses.view_as(target_ids)

    def forward(self, input_ids: Tensor, target_ids: Tensor | None = None) -> Tensor:
        """Mean cross-entropy over all tokens when targets are given (the reference's
        training/eval call; in training mode with the terms model.loss switches on, as
        model/loss.py computes them), else float32 logits [B, T, vocab]."""
        if target_ids is None:
            return self.logits(input_ids)
        if self.training and self.cfg.structure.mirror > 0:  # model.structure.mirror: some sequences backwards
            input_ids, target_ids = mirror_batch(input_ids, target_ids, self.cfg.structure.mirror)
        if self.training and self.cfg.loss.active():  # model.loss.*: terms of the training loss only
            return training_loss(self, input_ids, target_ids)
        if self.cfg.embeddings.fused_ce:  # the cap applied in fp32 inside one kernel (not bit-identical)
            return softcap_cross_entropy(self.head(self.hidden(input_ids)), target_ids, self.cfg.embeddings.logit_softcap)
        logits = self.capped_logits(self.hidden(input_ids))
        return F.cross_entropy(logits.float().flatten(0, 1), target_ids.flatten(), reduction="mean")


def build(cfg: GPTConfig) -> GPT:
    """Validate `cfg` and build the model in fp32 on the CPU (move and cast it afterwards,
    e.g. with `underpar.model.precision.cast_for_bf16_training`)."""
    return GPT(cfg)


def num_params(model: nn.Module) -> int:
    """All parameters of `model`, counted once each."""
    return sum(p.numel() for p in model.parameters())


__all__ = ["GPTConfig", "GPT", "build", "num_params"]
