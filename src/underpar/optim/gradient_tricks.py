"""The 131-run experiment log's gradient tricks (`optim.gradient_trick`, phase 9: all of them
hurt there): per-block gradient scaling by depth, gradients shared between distant blocks,
random boosts to random blocks, and LR / weight-decay multipliers of progress. Hooks and the
registry are in optim/dynamics.py.
"""

from __future__ import annotations

import dataclasses
import math

import torch
from torch import Tensor, nn

from underpar.config import bounded, items
from underpar.errors import ConfigError
from underpar.optim.dynamics import GRADIENT_TRICKS, Hooks, layers_of, step_generator

def _needs_layers(model: nn.Module, at_least: int, what: str) -> list[list[tuple[str, nn.Parameter]]]:
    layers = layers_of(model)
    if len(layers) < at_least:
        raise ConfigError(f"{what} needs at least {at_least} blocks; the model has {len(layers)} (model.num_layers)")
    return layers


@GRADIENT_TRICKS.register("canopy_light")
@dataclasses.dataclass
class CanopyLight:
    """W1/W7: each block's gradients scaled by its depth, linearly from `bottom` (the first
    block, nearest the embedding) to `top` (the last), as the log's 0.3x..1.0x. Note: Adam and
    Muon are both nearly invariant to a constant per-tensor gradient scale (Adam divides by the
    running RMS, Muon orthogonalizes), so with these optimizers it changes little besides
    clipping; the log's +0.247 may have come from something its code did beyond this."""

    bottom: float = bounded(0.3, 0.0)
    top: float = bounded(1.0, 0.0)

    def build(self, model: nn.Module, seed: int) -> Hooks:
        layers = _needs_layers(model, 1, "optim.gradient_trick = canopy_light")
        last = len(layers) - 1
        scales = [self.bottom + (self.top - self.bottom) * i / last if last else self.top for i in range(len(layers))]
        return _Canopy(layers, scales)


class _Canopy(Hooks):
    def __init__(self, layers: list[list[tuple[str, nn.Parameter]]], scales: list[float]):
        self.layers, self.scales = layers, scales

    @torch.no_grad()
    def after_backward(self, step: int) -> None:
        for layer, scale in zip(self.layers, self.scales):
            grads = [p.grad for _, p in layer if p.grad is not None]
            if grads and scale != 1.0:
                torch._foreach_mul_(grads, scale)


@GRADIENT_TRICKS.register("mycorrhizal")
@dataclasses.dataclass
class Mycorrhizal:
    """W4/W8: gradients shared between blocks `distance` apart (the log: 3): each block's
    gradient becomes (1 - blend) * its own + blend * the mean of its partners' (the blocks
    i - distance and i + distance that exist), all from the gradients before blending. The
    log gives no blend weight; 0.1 is our choice."""

    distance: int = bounded(3, 1)
    blend: float = bounded(0.1, 0.0, 1.0)

    def build(self, model: nn.Module, seed: int) -> Hooks:
        layers = _needs_layers(model, self.distance + 1, f"optim.gradient_trick.distance = {self.distance}")
        return _Mycorrhizal(layers, self.distance, self.blend)


class _Mycorrhizal(Hooks):
    def __init__(self, layers: list[list[tuple[str, nn.Parameter]]], distance: int, blend: float):
        self.blend = blend
        # per block: [(param, [partner params of the same role and shape])]
        roles = [{name.split(".", 2)[2]: p for name, p in layer} for layer in layers]
        self.links: list[tuple[Tensor, list[Tensor]]] = []
        for i, own in enumerate(roles):
            partners = [roles[j] for j in (i - distance, i + distance) if 0 <= j < len(roles)]
            for role, p in own.items():
                others = [q[role] for q in partners if role in q and q[role].shape == p.shape]
                if others:
                    self.links.append((p, others))

    @torch.no_grad()
    def after_backward(self, step: int) -> None:
        before = {id(p): p.grad.clone() for p, _ in self.links if p.grad is not None}
        for p, others in self.links:
            grads = [before[id(q)] for q in others if id(q) in before]
            if p.grad is None or not grads:
                continue
            shared = torch.stack(grads).mean(dim=0)
            p.grad.mul_(1.0 - self.blend).add_(shared, alpha=self.blend)


@GRADIENT_TRICKS.register("thermal_vent")
@dataclasses.dataclass
class ThermalVent:
    """W5/W9: every step `layers` distinct blocks drawn at random (the log: 2) get their
    gradients multiplied by a factor drawn uniformly from [min_boost, max_boost] (2x-3x), one
    per block; the draws are a function of (train.seed, step)."""

    layers: int = bounded(2, 1)
    min_boost: float = bounded(2.0, 0.0)
    max_boost: float = bounded(3.0, 0.0)

    def check(self) -> None:
        if self.min_boost > self.max_boost:
            raise ConfigError(f"optim.gradient_trick.min_boost ({self.min_boost}) must not exceed max_boost ({self.max_boost})")

    def build(self, model: nn.Module, seed: int) -> Hooks:
        layers = _needs_layers(model, self.layers, f"optim.gradient_trick.layers = {self.layers}")
        return _Vent(layers, self, seed)


class _Vent(Hooks):
    def __init__(self, layers: list[list[tuple[str, nn.Parameter]]], cfg: ThermalVent, seed: int):
        self.all_layers, self.cfg, self.seed = layers, cfg, seed

    def draw(self, step: int) -> list[tuple[int, float]]:
        """(block, boost) for the `layers` blocks boosted at `step`."""
        generator = step_generator(self.seed, step)
        chosen = torch.randperm(len(self.all_layers), generator=generator)[: self.cfg.layers].tolist()
        boosts = torch.empty(len(chosen), dtype=torch.float64).uniform_(self.cfg.min_boost, self.cfg.max_boost, generator=generator)
        return list(zip(chosen, boosts.tolist()))

    @torch.no_grad()
    def after_backward(self, step: int) -> None:
        for block, boost in self.draw(step):
            grads = [p.grad for _, p in self.all_layers[block] if p.grad is not None]
            if grads:
                torch._foreach_mul_(grads, boost)


@GRADIENT_TRICKS.register("punctuated_equilibrium")
@dataclasses.dataclass
class PunctuatedEquilibrium:
    """W3: the LR rests at `floor` times the schedule's and rises in Gaussian bursts back to the
    full schedule at 25%, 50% and 75% of training (the log's centres): multiplier = floor +
    (1 - floor) * max over centres of exp(-(progress - c)^2 / (2 width^2)). The log gives no
    floor or width; 0.3 and 0.03 are our choice."""

    floor: float = bounded(0.3, 0.0, 1.0)
    width: float = bounded(0.03, 1e-6, 1.0)
    centres: list[float] = items([0.25, 0.5, 0.75])

    def check(self) -> None:
        if not self.centres or not all(0.0 <= c <= 1.0 for c in self.centres):
            raise ConfigError(f"optim.gradient_trick.centres = {self.centres} must be one or more progress values in [0, 1]")

    def build(self, model: nn.Module, seed: int) -> Hooks:
        return _Bursts(self)


class _Bursts(Hooks):
    def __init__(self, cfg: PunctuatedEquilibrium):
        self.cfg = cfg

    def lr_multiplier(self, progress: float) -> float:
        c = self.cfg
        burst = max(math.exp(-((progress - x) ** 2) / (2 * c.width**2)) for x in c.centres)
        return c.floor + (1.0 - c.floor) * burst


@GRADIENT_TRICKS.register("predator_prey")
@dataclasses.dataclass
class PredatorPrey:
    """W2/W10 ("Lotka-Volterra"): LR and weight decay oscillate in opposition over training:
    LR x (1 + amplitude * sin(2 pi cycles progress)), weight decay x (1 - amplitude * sin(...)).
    The weight decay part acts only where a weight decay is configured (optim.muon_weight_decay,
    optim.adam_weight_decay). The log gives neither amplitude nor period; 0.5 and 3 cycles are
    our choice."""

    amplitude: float = bounded(0.5, 0.0, 1.0)
    cycles: float = bounded(3.0, 0.0)

    def build(self, model: nn.Module, seed: int) -> Hooks:
        return _Opposition(self)


class _Opposition(Hooks):
    def __init__(self, cfg: PredatorPrey):
        self.cfg = cfg

    def _wave(self, progress: float) -> float:
        return self.cfg.amplitude * math.sin(2 * math.pi * self.cfg.cycles * progress)

    def lr_multiplier(self, progress: float) -> float:
        return 1.0 + self._wave(progress)

    def wd_multiplier(self, progress: float) -> float:
        return 1.0 - self._wave(progress)
