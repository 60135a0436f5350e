"""Training dynamics of the 131-run experiment log as registered switches: weight-level
dynamics (`optim.weight_dynamics`), gradient tricks (`optim.gradient_trick`) and the
weight-decay schedule (`optim.weight_decay_schedule`).

Each entry is a parameter dataclass whose `build(model, seed)` returns Hooks the trainer calls
around every optimizer step: `after_backward` (edits gradients, before clipping),
`after_step` (edits weights), and LR / weight-decay multipliers of progress (on top of the
LR schedule and the configured weight decays). The gradient tricks live in
optim/gradient_tricks.py, registered in GRADIENT_TRICKS here. All of it is eager, outside the compiled
forward, so nothing recompiles; every random draw comes from a generator seeded with
(seed, step), so a run is deterministic given its seed and a resumed run draws exactly what
an uninterrupted one would (the step counter travels in checkpoints, see `Dynamics`).

The log's own code is not public: where it names a number (5% every 50 steps, 0.3x at the
bottom, distance 3, 2-3x on 2 layers, bursts at 25/50/75%) that number is the default; where
it does not, the docstring says which value was chosen. The log found all of these neutral
or harmful (phases 2, 4, 5, 9, 17, 18); they are here to rerun its experiments.
Metamorphosis (N6) sets the rate of the model's dropout (model.dropout, model/block.py): a
buffer the compiled graph reads, so the weight-level hooks stay eager and nothing recompiles.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Sequence
from typing import Any, Protocol

import torch
from torch import Tensor, nn

from underpar.config import bounded
from underpar.errors import ConfigError, UnderparError
from underpar.optim.groups import is_block_matrix, is_control
from underpar.registry import Registry


class Hooks:
    """No change: the baseline's training step."""

    def after_backward(self, step: int) -> None:
        """Gradients of optimizer step `step` (1-based) are complete (all micro-steps, all ranks)."""

    def after_step(self, step: int, progress: float) -> None:
        """The optimizers have taken step `step` at `progress` in [0, 1]."""

    def lr_multiplier(self, progress: float) -> float:
        return 1.0

    def wd_multiplier(self, progress: float) -> float:
        return 1.0

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


class HooksConfig(Protocol):
    def build(self, model: nn.Module, seed: int) -> Hooks: ...


WEIGHT_DYNAMICS: Registry[type[HooksConfig]] = Registry("weight_dynamics")
GRADIENT_TRICKS: Registry[type[HooksConfig]] = Registry("gradient_trick")
WEIGHT_DECAY_SCHEDULES: Registry[type] = Registry("weight_decay_schedule")


def step_generator(seed: int, step: int, device: torch.device | str = "cpu") -> torch.Generator:
    """A generator for the draws of one step: a function of (seed, step) only."""
    return torch.Generator(device=device).manual_seed(seed * 1_000_003 + step)


def block_matrices(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """The weights the weight-level dynamics act on: the blocks' 2-D matrices (Muon's share,
    most of the parameters), not embeddings, head, norms, gains or control tensors."""
    return [(n, p) for n, p in model.named_parameters()
            if p.requires_grad and is_block_matrix(n, p) and not is_control(n, p)]


def layers_of(model: nn.Module) -> list[list[tuple[str, nn.Parameter]]]:
    """Every trainable parameter of each block (`blocks.<i>.`), in block order; the depth the
    gradient tricks mean. Embedding, head, skip weights and adapters belong to no layer."""
    layers: dict[int, list[tuple[str, nn.Parameter]]] = {}
    for name, p in model.named_parameters():
        if p.requires_grad and (m := re.match(r"blocks\.(\d+)\.", name)):
            layers.setdefault(int(m.group(1)), []).append((name, p))
    return [layers[i] for i in sorted(layers)]


@WEIGHT_DYNAMICS.register("none")
@GRADIENT_TRICKS.register("none")
@dataclasses.dataclass
class NoDynamics:
    """Nothing changes (the baseline)."""

    def build(self, model: nn.Module, seed: int) -> Hooks:
        return Hooks()


# ---- weight-level dynamics


@WEIGHT_DYNAMICS.register("controlled_burn")
@dataclasses.dataclass
class ControlledBurn:
    """N1/NF7: every `every_steps` steps the smallest `fraction` of each block matrix's weights
    by magnitude is set to 0 (exactly floor(fraction * numel) of them). Not a mask: the
    optimizer may grow them back before the next burn, as a fire clears undergrowth."""

    fraction: float = bounded(0.05, 0.0, 1.0)
    every_steps: int = bounded(50, 1)

    def build(self, model: nn.Module, seed: int) -> Hooks:
        return _Burn([p for _, p in block_matrices(model)], self.fraction, self.every_steps)


class _Burn(Hooks):
    def __init__(self, params: Sequence[Tensor], fraction: float, every_steps: int):
        self.params, self.fraction, self.every_steps = list(params), fraction, every_steps

    @torch.no_grad()
    def after_step(self, step: int, progress: float) -> None:
        if step % self.every_steps:
            return
        for p in self.params:
            count = int(self.fraction * p.numel())
            if count:
                flat = p.view(-1)
                flat[torch.topk(flat.abs(), count, largest=False, sorted=False).indices] = 0


@WEIGHT_DYNAMICS.register("mutation")
@dataclasses.dataclass
class Mutation:
    """N4/NF10 (weight perturbation, "viral mutation"): every `every_steps` steps each block
    matrix gets Gaussian noise of standard deviation std * exp(-decay * progress). The log's
    perturbation is 1e-4 every 100 steps (decay 0). Mutation decay (NF6, NF9: 0.001,
    "exponentially decaying") gives no rate or period; decay = 5 (std falls to e^-5 of its
    start by the end) with every_steps = 100 is our choice for it."""

    std: float = bounded(1e-4, 0.0)
    every_steps: int = bounded(100, 1)
    decay: float = bounded(0.0, 0.0)

    def build(self, model: nn.Module, seed: int) -> Hooks:
        return _Mutation([p for _, p in block_matrices(model)], self, seed)


class _Mutation(Hooks):
    def __init__(self, params: Sequence[Tensor], cfg: Mutation, seed: int):
        self.params, self.cfg, self.seed = list(params), cfg, seed

    @torch.no_grad()
    def after_step(self, step: int, progress: float) -> None:
        if step % self.cfg.every_steps or not self.params:
            return
        std = self.cfg.std * math.exp(-self.cfg.decay * progress)
        generator = step_generator(self.seed, step, self.params[0].device)
        for p in self.params:
            noise = torch.randn(p.shape, generator=generator, device=p.device, dtype=torch.float32)
            p.add_((noise * std).to(p.dtype))


@WEIGHT_DYNAMICS.register("synaptic_scaling")
@dataclasses.dataclass
class SynapticScaling:
    """NF5: after every `every_steps`-th step (the log: every step) each block matrix is
    rescaled to the Frobenius norm it had at initialization. Matrices initialized to zero (the
    output projections) are left alone: they have no norm to return to (the log does not say
    what it did with them)."""

    every_steps: int = bounded(1, 1)

    def build(self, model: nn.Module, seed: int) -> Hooks:
        return _Scaling([p for _, p in block_matrices(model)], self.every_steps)


class _Scaling(Hooks):
    def __init__(self, params: Sequence[Tensor], every_steps: int):
        self.every_steps = every_steps
        with torch.no_grad():
            norms = [float(torch.linalg.vector_norm(p, dtype=torch.float32)) for p in params]
        self.params = [p for p, n in zip(params, norms) if n > 0]
        self.initial_norms = [n for n in norms if n > 0]

    @torch.no_grad()
    def after_step(self, step: int, progress: float) -> None:
        if step % self.every_steps:
            return
        for p, target in zip(self.params, self.initial_norms):
            norm = torch.linalg.vector_norm(p, dtype=torch.float32)
            p.mul_((target / norm.clamp_min(1e-12)).to(p.dtype))

    def state_dict(self) -> dict[str, Any]:
        return {"initial_norms": list(self.initial_norms)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if len(state["initial_norms"]) != len(self.params):
            raise UnderparError(f"the checkpoint scales {len(state['initial_norms'])} matrices; "
                                f"this model has {len(self.params)}")
        self.initial_norms = list(state["initial_norms"])


@WEIGHT_DYNAMICS.register("metamorphosis")
@dataclasses.dataclass
class Metamorphosis:
    """N6: dropout decayed from model.dropout (the log: 10%, so set model.dropout = 0.1) to 0
    over the first `until` of training (the log: the first half), linearly, and 0 after:
    p = p0 * max(0, 1 - progress / until). Each step runs at the rate of the progress the
    step before it was taken at (the first at p0), set after every optimizer step."""

    until: float = bounded(0.5, 0.01, 1.0)

    def rate(self, p0: float, progress: float) -> float:
        return p0 * max(0.0, 1.0 - progress / self.until)

    @staticmethod
    def check_dropout(p0: float) -> None:
        """Refuse a model without dropout (checked with the config and again at build)."""
        if not p0:
            raise ConfigError("optim.weight_dynamics = 'metamorphosis' decays model.dropout, which is 0 here: "
                              "set model.dropout to the starting rate (the log's N6: 0.1)")

    def build(self, model: nn.Module, seed: int) -> Hooks:
        p0 = getattr(getattr(model, "cfg", None), "dropout", 0.0)
        self.check_dropout(p0)
        return _Metamorphosis(model, p0, self)


class _Metamorphosis(Hooks):
    def __init__(self, model: nn.Module, p0: float, cfg: Metamorphosis):
        self.model, self.p0, self.cfg = model, p0, cfg
        self._set(p0)

    def _set(self, rate: float) -> None:
        self.current = rate
        self.model.set_dropout(rate)

    def after_step(self, step: int, progress: float) -> None:
        self._set(self.cfg.rate(self.p0, progress))

    def state_dict(self) -> dict[str, Any]:
        return {"rate": self.current}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._set(float(state["rate"]))


# ---- weight-decay schedule


@WEIGHT_DECAY_SCHEDULES.register("constant")
@dataclasses.dataclass
class ConstantWeightDecay:
    """The configured weight decays all the way (the baseline)."""

    def __call__(self, progress: float) -> float:
        return 1.0


@WEIGHT_DECAY_SCHEDULES.register("ramp")
@dataclasses.dataclass
class RampWeightDecay:
    """G3/H4: weight decay ramped linearly from `start` times the configured value to the full
    value at the end of training (the log: 0 -> 0.01 and 0 -> 0.04, i.e. start 0 with
    optim.muon_weight_decay / adam_weight_decay = 0.01 or 0.04; the log does not say which
    parameters it decayed). Both were "catastrophically" worse there."""

    start: float = bounded(0.0, 0.0, 1.0)

    def __call__(self, progress: float) -> float:
        return self.start + (1.0 - self.start) * min(max(progress, 0.0), 1.0)


class Dynamics:
    """What the trainer holds: the weight dynamics, the gradient trick and the weight-decay
    schedule together, with the optimizer step counter their periods and draws follow."""

    def __init__(self, weight_dynamics: Hooks, gradient_trick: Hooks, wd_schedule: Any):
        self.parts = {"weight_dynamics": weight_dynamics, "gradient_trick": gradient_trick}
        self.wd_schedule = wd_schedule
        self.steps = 0  # optimizer steps taken

    def lr_multiplier(self, progress: float) -> float:
        return self.parts["weight_dynamics"].lr_multiplier(progress) * self.parts["gradient_trick"].lr_multiplier(progress)

    def wd_multiplier(self, progress: float) -> float:
        return self.wd_schedule(progress) * math.prod(h.wd_multiplier(progress) for h in self.parts.values())

    def after_backward(self) -> None:
        for hooks in self.parts.values():
            hooks.after_backward(self.steps + 1)

    def after_step(self, progress: float) -> None:
        self.steps += 1
        for hooks in self.parts.values():
            hooks.after_step(self.steps, progress)

    def state_dict(self) -> dict[str, Any]:
        return {"steps": self.steps, **{k: h.state_dict() for k, h in self.parts.items()}}

    def load_state_dict(self, state: dict[str, Any] | None) -> None:
        """Restore `state_dict()`; None (a checkpoint from before dynamics were saved) is taken
        as step 0 only when nothing here keeps state or counts steps."""
        if state is None:
            if any(type(h) is not Hooks for h in self.parts.values()):
                raise UnderparError("this checkpoint holds no optim.weight_dynamics / gradient_trick state; "
                                    "resume it with the settings it was started with")
            return
        self.steps = int(state["steps"])
        for key, hooks in self.parts.items():
            hooks.load_state_dict(state[key])
