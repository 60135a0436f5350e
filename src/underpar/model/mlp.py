"""The MLP: its config (`model.mlp.*`), the activation registry (`model.mlp.activation`) and
the MLP itself. Adding an activation = one registered function here.

An activation is `fn(x)`, elementwise. One with a setting takes it as a keyword-only argument
named after the `MLPConfig` field that holds it (`leaky_relu2(x, *, leaky_slope)`), and the
MLP binds the field's value. One registered with `gated=True` (swiglu) is the nonlinearity of
a gated MLP, proj(act(gate(x)) * fc(x)), which has a third matrix.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from underpar.config import bounded, choice
from underpar.model.linear import CastedLinear
from underpar.registry import Registry

# name -> elementwise function applied to the MLP's hidden layer (the gate's, when gated).
ACTIVATIONS: Registry[Callable[..., Tensor]] = Registry("activation")


def gated(fn: Callable[..., Tensor]) -> Callable[..., Tensor]:
    """Mark `fn` as the nonlinearity of a gated MLP (register it with `ACTIVATIONS` after)."""
    fn.gated = True  # type: ignore[attr-defined]
    return fn


def is_gated(name: str) -> bool:
    return getattr(ACTIVATIONS[name], "gated", False)


@ACTIVATIONS.register("relu2")
def relu2(x: Tensor) -> Tensor:
    return torch.relu(x).square()


@ACTIVATIONS.register("leaky_relu2")
def leaky_relu2(x: Tensor, *, leaky_slope: float = 0.5) -> Tensor:
    """leaky_relu(x)^2; the records use slope 0.5 (the 131-run log's A1 used 0.01)."""
    return F.leaky_relu(x, negative_slope=leaky_slope).square()


@ACTIVATIONS.register("silu2")
def silu2(x: Tensor) -> Tensor:
    return F.silu(x).square()


@ACTIVATIONS.register("gelu2")
def gelu2(x: Tensor) -> Tensor:
    return F.gelu(x).square()


@ACTIVATIONS.register("swiglu")
@gated
def swiglu(gate: Tensor) -> Tensor:
    """SwiGLU's gate nonlinearity: the MLP computes proj(silu(gate(x)) * fc(x))."""
    return F.silu(gate)


@ACTIVATIONS.register("gelu")
def gelu(x: Tensor) -> Tensor:
    return F.gelu(x)


@ACTIVATIONS.register("silu")
def silu(x: Tensor) -> Tensor:
    return F.silu(x)


@ACTIVATIONS.register("relu")
def relu(x: Tensor) -> Tensor:
    return torch.relu(x)


@dataclasses.dataclass
class MLPConfig:
    # Width = mult * model_dim (must come out a whole number; the model checks it). A gated
    # activation (swiglu) has three matrices instead of two, so its hidden width is
    # floor(2/3 * mult * model_dim): the same parameters as the ungated MLP at this mult
    # (exactly when 3 divides 2 * mult * model_dim, else fewer by less than 3 * model_dim).
    mult: float = bounded(2.0, 0.0)
    activation: str = choice("relu2", ACTIVATIONS)
    # Negative slope of leaky_relu2 (unused by the other activations).
    leaky_slope: float = bounded(0.5, 0.0, 1.0)

    def hidden_dim(self, model_dim: int) -> int:
        width = int(self.mult * model_dim)
        return 2 * width // 3 if is_gated(self.activation) else width


def bind_activation(cfg: MLPConfig) -> Callable[[Tensor], Tensor]:
    """The configured activation with its settings (keyword-only arguments named after
    MLPConfig fields) bound to the config's values."""
    fn = ACTIVATIONS[cfg.activation]
    settings = {
        p.name: getattr(cfg, p.name)
        for p in inspect.signature(fn).parameters.values()
        if p.kind is inspect.Parameter.KEYWORD_ONLY
    }
    return functools.partial(fn, **settings) if settings else fn


class MLP(nn.Module):
    """fc -> activation -> zero-initialized projection back to the model width; gated:
    proj(act(gate(x)) * fc(x))."""

    def __init__(self, dim: int, cfg: MLPConfig):
        super().__init__()
        hidden = cfg.hidden_dim(dim)
        self.fc = CastedLinear(dim, hidden)
        self.gate = CastedLinear(dim, hidden) if is_gated(cfg.activation) else None
        self.proj = CastedLinear(hidden, dim, zero_init=True)
        self.activation = bind_activation(cfg)

    def forward(self, x_btd: Tensor) -> Tensor:
        if self.gate is not None:
            return self.proj(self.activation(self.gate(x_btd)) * self.fc(x_btd))
        return self.proj(self.activation(self.fc(x_btd)))
