"""The MLP: its config (`model.mlp.*`), the activation registry (`model.mlp.activation`) and
the two-layer MLP itself. Adding an activation = one registered function here."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from underpar.config import bounded, choice
from underpar.model.linear import CastedLinear
from underpar.registry import Registry

# name -> elementwise function applied to the MLP's hidden layer.
ACTIVATIONS: Registry[Callable[[Tensor], Tensor]] = Registry("activation")


@ACTIVATIONS.register("relu2")
def relu2(x: Tensor) -> Tensor:
    return torch.relu(x).square()


@ACTIVATIONS.register("leaky_relu2")
def leaky_relu2(x: Tensor) -> Tensor:
    return F.leaky_relu(x, negative_slope=0.5).square()


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
    # Hidden width = mult * model_dim (must come out a whole number; the model checks it).
    mult: float = bounded(2.0, 0.0)
    activation: str = choice("relu2", ACTIVATIONS)

    def hidden_dim(self, model_dim: int) -> int:
        return int(self.mult * model_dim)


class MLP(nn.Module):
    """fc -> activation -> zero-initialized projection back to the model width."""

    def __init__(self, dim: int, cfg: MLPConfig):
        super().__init__()
        hidden = cfg.hidden_dim(dim)
        self.fc = CastedLinear(dim, hidden)
        self.proj = CastedLinear(hidden, dim, zero_init=True)
        self.activation = ACTIVATIONS[cfg.activation]

    def forward(self, x_btd: Tensor) -> Tensor:
        return self.proj(self.activation(self.fc(x_btd)))
