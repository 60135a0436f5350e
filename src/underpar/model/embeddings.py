"""The token embedding and the output head (which may share the embedding's weight): their
config (`model.embeddings.*`) and the logit softcap."""

from __future__ import annotations

import dataclasses

import torch
from torch import Tensor

from underpar.config import bounded


@dataclasses.dataclass
class EmbeddingsConfig:
    # The output head reuses the token embedding's weight.
    tied: bool = True
    # Init std of the tied token embedding; an untied embedding keeps PyTorch's N(0, 1).
    tied_init_std: float = bounded(0.005, 0.0)
    # logits = softcap * tanh(logits / softcap); 0 disables the cap.
    logit_softcap: float = bounded(30.0, 0.0)


def softcap(logits: Tensor, cap: float) -> Tensor:
    """cap * tanh(logits / cap), which bounds the logits to (-cap, cap); 0 leaves them as they are."""
    if cap > 0:
        return cap * torch.tanh(logits / cap)
    return logits
