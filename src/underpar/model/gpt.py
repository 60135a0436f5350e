"""The Parameter Golf baseline GPT, built from a validated `GPTConfig`.

Defaults reproduce the reference `train_gpt.py` exactly (17,059,912 parameters); parameter
names match its state-dict keys, and modules are created in its order so a seed gives the
same initial weights.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from underpar.config import bounded, choice, validate
from underpar.errors import ConfigError
from underpar.model.layers import ACTIVATIONS, ROPE_DTYPES, Block, CastedLinear, rms_norm


@dataclasses.dataclass
class GPTConfig:
    vocab_size: int = bounded(1024, 2)
    num_layers: int = bounded(9, 1)
    model_dim: int = bounded(512, 2)
    num_heads: int = bounded(8, 1)
    num_kv_heads: int = bounded(4, 1)
    # MLP hidden width = mlp_mult * model_dim (must come out a whole number).
    mlp_mult: float = bounded(2.0, 0.0)
    mlp_activation: str = choice("relu2", ACTIVATIONS)
    tie_embeddings: bool = True
    # Init std of the (tied) token embedding; an untied embedding keeps PyTorch's N(0, 1).
    tied_embed_init_std: float = bounded(0.005, 0.0)
    rope_base: float = bounded(10000.0, 1.0)
    # float32: exact rotary phases. bfloat16: the reference script's rounded phases.
    rope_dtype: str = choice("float32", ROPE_DTYPES)
    # logits = softcap * tanh(logits / softcap); 0 disables the cap.
    logit_softcap: float = bounded(30.0, 0.0)
    qk_gain_init: float = 1.5

    def check(self) -> None:
        if self.model_dim % self.num_heads != 0:
            raise ConfigError(
                f"model_dim = {self.model_dim} must be divisible by num_heads = {self.num_heads}"
            )
        if self.num_heads % self.num_kv_heads != 0:
            raise ConfigError(
                f"num_heads = {self.num_heads} must be divisible by "
                f"num_kv_heads = {self.num_kv_heads}"
            )
        head_dim = self.model_dim // self.num_heads
        if head_dim % 2 != 0:
            raise ConfigError(
                f"model_dim / num_heads = {head_dim} (the head dim) must be even "
                f"for rotary embeddings"
            )
        hidden = self.mlp_mult * self.model_dim
        if hidden < 1 or hidden != int(hidden):
            raise ConfigError(
                f"mlp_mult = {self.mlp_mult} gives an MLP width of {hidden} "
                f"(mlp_mult * model_dim); it must be a positive whole number"
            )


class GPT(nn.Module):
    """Token embedding -> U-Net of blocks -> final RMS norm -> (tied) head -> softcap.

    The first num_layers // 2 blocks are the encoder: each output is saved. The rest are
    the decoder: before each of the first len(saved) decoder blocks, the most recently
    saved output is added back, scaled per dim by a learned row of `skip_weights`.
    """

    def __init__(self, cfg: GPTConfig):
        super().__init__()
        validate(cfg)
        self.cfg = cfg
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.model_dim)
        self.num_encoder_layers = cfg.num_layers // 2
        self.num_decoder_layers = cfg.num_layers - self.num_encoder_layers
        self.num_skips = min(self.num_encoder_layers, self.num_decoder_layers)
        self.skip_weights = nn.Parameter(torch.ones(self.num_skips, cfg.model_dim))
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.num_layers))
        self.lm_head = None
        if not cfg.tie_embeddings:
            self.lm_head = CastedLinear(cfg.model_dim, cfg.vocab_size, zero_init=True)
        # Last, after every other random init, as in the reference (same RNG order).
        if cfg.tie_embeddings:
            nn.init.normal_(self.tok_emb.weight, mean=0.0, std=cfg.tied_embed_init_std)

    def hidden(self, input_ids: Tensor) -> Tensor:
        """Final normed hidden states [B, T, model_dim]."""
        x = rms_norm(self.tok_emb(input_ids))
        x0 = x
        saved: list[Tensor] = []
        for block in self.blocks[: self.num_encoder_layers]:
            x = block(x, x0)
            saved.append(x)
        for i, block in enumerate(self.blocks[self.num_encoder_layers :]):
            if i < self.num_skips:
                x = x + self.skip_weights[i].to(x.dtype)[None, None, :] * saved.pop()
            x = block(x, x0)
        return rms_norm(x)

    def capped_logits(self, hidden: Tensor) -> Tensor:
        """Softcapped logits in the compute dtype (bf16 under autocast)."""
        if self.lm_head is None:
            logits = F.linear(hidden, self.tok_emb.weight)
        else:
            logits = self.lm_head(hidden)
        cap = self.cfg.logit_softcap
        if cap > 0:
            logits = cap * torch.tanh(logits / cap)
        return logits

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
        training/eval call), else float32 logits [B, T, vocab]."""
        if target_ids is None:
            return self.logits(input_ids)
        logits = self.capped_logits(self.hidden(input_ids))
        return F.cross_entropy(logits.float().flatten(0, 1), target_ids.flatten(), reduction="mean")


def build(cfg: GPTConfig) -> GPT:
    """Validate `cfg` and build the model in fp32 on the CPU (move and cast it afterwards,
    e.g. with `underpar.model.precision.cast_for_bf16_training`)."""
    return GPT(cfg)


def num_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


__all__ = ["GPTConfig", "GPT", "build", "num_params"]
