"""LISA (Layerwise Importance Sampled AdamW), with LMFlow's semantics: every `interval`
optimizer steps, freeze all decoder layers and unfreeze `n_layers` of them drawn uniformly
without replacement; embeddings, final norm and lm_head always train; the forward is the full
model. The draw is seeded by (seed, block), so a run is reproducible. Registered as the
fine-tuning method "lisa" (`--set method=lisa`, settings `method.interval`, ...)."""

from __future__ import annotations

import dataclasses
import random

import torch
from torch import nn

from underpar.config import bounded, validate
from underpar.errors import ConfigError
from underpar.model.surgery import original_layers
from underpar.tracks.finetune_methods import METHODS, Controller, MethodConfig


@METHODS.register("lisa")
@dataclasses.dataclass
class LisaConfig(MethodConfig):
    interval: int = bounded(20, 1)  # optimizer steps per block
    n_layers: int = bounded(2, 1)  # decoder layers that train in each block
    seed: int = bounded(0, 0)

    def controller(self, model: nn.Module) -> LisaController:
        return LisaController(model, self)


class LisaController(Controller):
    """`begin(optimizer_step)` starts a new block when the step crosses a block boundary and
    returns its trained layer indices; `begin_block(block)` sets `requires_grad` for a block;
    `end()` puts the original `requires_grad` flags back."""

    def __init__(self, model: nn.Module, cfg: LisaConfig):
        validate(cfg)
        super().__init__(model)
        self.cfg = cfg
        self.layers = original_layers(model)
        if cfg.n_layers > len(self.layers):
            raise ConfigError(
                f"method.n_layers = {cfg.n_layers} but the model has only {len(self.layers)} decoder layers"
            )
        self.block: int | None = None
        self._requires_grad = [(p, p.requires_grad) for p in model.parameters()]

    def layers_of(self, block: int) -> list[int]:
        rng = random.Random(f"underpar.lisa/{self.cfg.seed}/{block}")
        return sorted(rng.sample(range(len(self.layers)), self.cfg.n_layers))

    def block_of(self, step: int) -> int:
        return step // self.cfg.interval

    def begin(self, step: int, optimizer: torch.optim.Optimizer | None = None) -> list[int] | None:
        block = self.block_of(step)
        return None if block == self.block else self.begin_block(block)

    def begin_block(self, block: int) -> list[int]:
        active = self.layers_of(block)
        in_layers = set()
        for i, layer in enumerate(self.layers):
            for p in layer.parameters():
                p.requires_grad_(i in active)
                in_layers.add(id(p))
        for p in self.model.parameters():
            if id(p) not in in_layers:
                p.requires_grad_(True)
            if not p.requires_grad:
                p.grad = None
        self.block = block
        return active

    def end(self, optimizer: torch.optim.Optimizer | None = None) -> None:
        """Put the original `requires_grad` flags back (LISA keeps no optimizer state aside)."""
        for p, flag in self._requires_grad:
            p.requires_grad_(flag)
        self.block = None
