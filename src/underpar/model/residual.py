"""The residual path across blocks (`model.residual.*`): the baseline's U-Net, where the
first half of the blocks (the encoder) save their outputs and the decoder adds them back in
reverse order, each scaled per dim by a learned row of `skip_weights`."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from torch import Tensor, nn


@dataclasses.dataclass
class ResidualConfig:
    # The baseline's encoder/decoder skips; false runs the blocks as a plain stack (no
    # encoder half, and `skip_weights` has no rows).
    unet_skips: bool = True


@dataclasses.dataclass(frozen=True)
class UNetLayout:
    num_encoder_layers: int
    num_decoder_layers: int
    # Decoder blocks that receive a saved encoder output: min(encoder, decoder).
    num_skips: int


def unet_layout(num_layers: int, cfg: ResidualConfig) -> UNetLayout:
    """The first num_layers // 2 blocks are the encoder (none without U-Net skips)."""
    encoder = num_layers // 2 if cfg.unet_skips else 0
    decoder = num_layers - encoder
    return UNetLayout(encoder, decoder, min(encoder, decoder))


def run_unet(
    blocks: Sequence[nn.Module], skip_weights: Tensor, layout: UNetLayout, x: Tensor, x0: Tensor
) -> Tensor:
    """Each encoder output is saved; before each of the first `num_skips` decoder blocks the
    most recently saved output is added back, scaled per dim by its row of `skip_weights`."""
    saved: list[Tensor] = []
    for block in blocks[: layout.num_encoder_layers]:
        x = block(x, x0)
        saved.append(x)
    for i, block in enumerate(blocks[layout.num_encoder_layers :]):
        if i < layout.num_skips:
            x = x + skip_weights[i].to(x.dtype)[None, None, :] * saved.pop()
        x = block(x, x0)
    return x
