"""The residual path across blocks (`model.residual.*`): the baseline's U-Net, where the
first blocks (the encoder) save their outputs and the decoder adds them back in reverse order,
each scaled per dim by a learned row of `skip_weights`; and how blocks sit on the stream
(sequential, parallel, or on two lanes from a start layer; model/block.py has the math).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from torch import Tensor, nn

from underpar.config import bounded
from underpar.errors import ConfigError


@dataclasses.dataclass
class ResidualConfig:
    # Blocks in the U-Net's encoder half: -1 = num_layers // 2 (the baseline), 0 = a pure
    # decoder (a plain stack, no skips; the 131-run log's ENCODER_LAYERS=0), n = the first n.
    encoder_layers: int = bounded(-1, -1)
    # From this block on, attention and MLP read the same input and both add to the stream
    # (PaLM / GPT-J style); 0 = every block (the log's PARALLEL_BLOCK=1); -1 = off.
    parallel_start: int = bounded(-1, -1)
    # From this (decoder) block on, the stream splits into two lanes (PR #1529/#1584's
    # dual-lane parallel residuals; the record starts at 8 of 11); -1 = off.
    two_lane_start: int = bounded(-1, -1)
    # Each block's norm outputs are scaled by 1/sqrt(layer + 1) (the records' LN_SCALE).
    layerwise_ln_scale: bool = False

    def num_encoder_layers(self, num_layers: int) -> int:
        return num_layers // 2 if self.encoder_layers < 0 else self.encoder_layers

    def check_with(self, num_layers: int) -> None:
        """The checks that need the model's depth."""
        encoder = self.num_encoder_layers(num_layers)
        if encoder > num_layers:
            raise ConfigError(
                f"model.residual.encoder_layers = {encoder} is more than model.num_layers = "
                f"{num_layers}"
            )
        if self.parallel_start >= num_layers:
            raise ConfigError(
                f"model.residual.parallel_start = {self.parallel_start} must be below "
                f"model.num_layers = {num_layers} (-1 turns parallel blocks off)"
            )
        if self.two_lane_start >= 0 and not encoder <= self.two_lane_start < num_layers:
            raise ConfigError(
                f"model.residual.two_lane_start = {self.two_lane_start} must name a decoder "
                f"block, {encoder}..{num_layers - 1} (the encoder is the first {encoder} of "
                f"{num_layers} blocks); -1 turns the two lanes off"
            )


@dataclasses.dataclass(frozen=True)
class UNetLayout:
    num_encoder_layers: int
    num_decoder_layers: int
    # Decoder blocks that receive a saved encoder output: min(encoder, decoder).
    num_skips: int
    # The first block on two lanes, or -1 (one stream throughout).
    two_lane_start: int = -1


def unet_layout(num_layers: int, cfg: ResidualConfig) -> UNetLayout:
    encoder = cfg.num_encoder_layers(num_layers)
    decoder = num_layers - encoder
    return UNetLayout(encoder, decoder, min(encoder, decoder), cfg.two_lane_start)


def run_unet(
    blocks: Sequence[nn.Module], skip_weights: Tensor, layout: UNetLayout, x: Tensor, x0: Tensor
) -> Tensor:
    """Each encoder output is saved; before each of the first `num_skips` decoder blocks the
    most recently saved output is added back, scaled per dim by its row of `skip_weights`.

    From block `two_lane_start` on, the stream is copied into two lanes that blocks update
    with `forward_lanes` (see Block); skips are added to lane 0 only, and the output is the
    mean of the two lanes (PR #1529's dual lane, as in the record PR #1584)."""
    saved: list[Tensor] = []
    for block in blocks[: layout.num_encoder_layers]:
        x = block(x, x0)
        saved.append(x)
    lanes: tuple[Tensor, Tensor] | None = None
    for i, block in enumerate(blocks[layout.num_encoder_layers :]):
        if layout.num_encoder_layers + i == layout.two_lane_start:
            lanes = (x, x)
        skip = skip_weights[i].to(x.dtype)[None, None, :] * saved.pop() if i < layout.num_skips else None
        if lanes is None:
            x = block(x if skip is None else x + skip, x0)
        else:
            lane0, lane1 = lanes
            lanes = block.forward_lanes(lane0 if skip is None else lane0 + skip, lane1, x0)
    if lanes is not None:
        x = 0.5 * (lanes[0] + lanes[1])
    return x
