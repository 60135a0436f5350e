"""The GPT's config: the shape fields every part shares (vocab, depth, width) plus one section
per part, each defined beside its part's code, and the checks that span sections.

    [model]                 vocab_size, num_layers, model_dim, dropout (model/block.py)
    [model.embeddings]      tied, tied_init_std, logit_softcap, bos_id, smear_gate,
                            smear_window, bigram_buckets, bigram_dim  (model/embeddings.py)
    [model.attention]       num_heads, num_kv_heads, rope_base, rope_dtype, qk_gain_init,
                            rotary_dims, rope_scaling, gate, xsa, xsa_layers
                                                                      (model/attention.py)
    [model.mlp]             mult, activation, leaky_slope             (model/mlp.py)
    [model.residual]        encoder_layers, parallel_start, two_lane_start,
                            layerwise_ln_scale                        (model/residual.py)
    [model.recurrence]      name = none | loop | shared, and its fields
                                                                      (model/recurrence.py)
    [model.loss]            z_loss, logit_penalty, token_dropout, embed_mixup,
                            label_smoothing, head_diversity (training loss only; model/loss.py)
    [model.structure]       layer_dropout, share_group, grow, attention_passes, mirror,
                            prune_heads_to, prune_at (the log's Phase 3; model/dynamic.py)

Defaults are the Parameter Golf baseline.
"""

from __future__ import annotations

import dataclasses

from underpar.config import bounded, nested, variant
from underpar.errors import ConfigError
from underpar.model.attention import AttentionConfig
from underpar.model.dynamic import StructureConfig
from underpar.model.embeddings import EmbeddingsConfig
from underpar.model.loss import LossConfig
from underpar.model.mlp import MLPConfig
from underpar.model.recurrence import RECURRENCES, NoRecurrence
from underpar.model.residual import ResidualConfig, unet_layout


@dataclasses.dataclass
class GPTConfig:
    vocab_size: int = bounded(1024, 2)
    num_layers: int = bounded(9, 1)
    model_dim: int = bounded(512, 2)
    # Dropout on every block's attention and MLP outputs in training (0: none, the baseline's
    # graph); optim.weight_dynamics = metamorphosis decays it (the log's N6: 0.1 -> 0).
    dropout: float = bounded(0.0, 0.0, 0.9)
    embeddings: EmbeddingsConfig = nested(EmbeddingsConfig)
    attention: AttentionConfig = nested(AttentionConfig)
    mlp: MLPConfig = nested(MLPConfig)
    residual: ResidualConfig = nested(ResidualConfig)
    recurrence: NoRecurrence = variant(RECURRENCES, "none")
    loss: LossConfig = nested(LossConfig)
    structure: StructureConfig = nested(StructureConfig)

    def check(self) -> None:
        heads, kv_heads = self.attention.num_heads, self.attention.num_kv_heads
        if self.model_dim % heads != 0:
            raise ConfigError(
                f"model.model_dim = {self.model_dim} must be divisible by "
                f"model.attention.num_heads = {heads}"
            )
        if heads % kv_heads != 0:
            raise ConfigError(
                f"model.attention.num_heads = {heads} must be divisible by "
                f"model.attention.num_kv_heads = {kv_heads}"
            )
        head_dim = self.model_dim // heads
        if head_dim % 2 != 0:
            raise ConfigError(
                f"model.model_dim / model.attention.num_heads = {head_dim} (the head dim) must "
                f"be even for rotary embeddings"
            )
        self.attention.check_with(self.model_dim, self.num_layers)
        hidden = self.mlp.mult * self.model_dim
        if hidden < 1 or hidden != int(hidden):
            raise ConfigError(
                f"model.mlp.mult = {self.mlp.mult} gives an MLP width of {hidden} "
                f"(mult * model_dim); it must be a positive whole number"
            )
        self.embeddings.check_with(self.model_dim)
        self.loss.check_with(self.embeddings)
        self.residual.check_with(self.num_layers)
        self.recurrence.check_with(self.num_layers)
        self.structure.check_with(self)
        if self.residual.two_lane_start >= 0 and self.recurrence.adapters(self.num_layers, 2) is not None:
            raise ConfigError("model.residual.two_lane_start: two lanes do not combine with the adapters of "
                              "model.recurrence = shared (set lora_rank = 0 or two_lane_start = -1)")
        unet_layout(self.recurrence.order(self.num_layers), self.residual)  # raises on a bad combination
