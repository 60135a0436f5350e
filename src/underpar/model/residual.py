"""The residual path across blocks (`model.residual.*`): the baseline's U-Net, where the
first blocks (the encoder) save their outputs and the decoder adds them back in reverse order,
each scaled per dim by a learned row of `skip_weights`; and how blocks sit on the stream
(sequential, parallel, or on two lanes from a start layer; model/block.py has the math).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import torch
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
    # The blocks in the order they run (model/recurrence.py; plain: 0..num_layers-1).
    order: tuple[int, ...]
    num_encoder_layers: int
    num_decoder_layers: int
    # Decoder positions that receive a saved encoder output: min(encoder, decoder).
    num_skips: int
    # The first position on two lanes, or -1 (one stream throughout).
    two_lane_pos: int = -1


def unet_layout(order: Sequence[int], cfg: ResidualConfig) -> UNetLayout:
    """The U-Net over the blocks in `order`: its first `encoder_layers` positions (-1: half of
    them) are the encoder. Two lanes begin at the first position of block `two_lane_start`,
    which must be in the decoder, and every later position must hold a two-lane block."""
    order = tuple(order)
    encoder = cfg.num_encoder_layers(len(order))
    if encoder > len(order):
        raise ConfigError(
            f"model.residual.encoder_layers = {encoder} is more than the {len(order)} layers "
            "that run"
        )
    decoder = len(order) - encoder
    two_lane_pos = -1
    if cfg.two_lane_start >= 0:
        two_lane_pos = order.index(cfg.two_lane_start)
        if two_lane_pos < encoder or any(block < cfg.two_lane_start for block in order[two_lane_pos:]):
            raise ConfigError(
                f"model.residual.two_lane_start = {cfg.two_lane_start}: the two lanes must begin "
                f"in the decoder and every block after that must be a two-lane block (blocks run "
                f"in the order {list(order)}, encoder = the first {encoder}); choose a later "
                "block (after any recurrence loop) or -1"
            )
    return UNetLayout(order, encoder, decoder, min(encoder, decoder), two_lane_pos)


def run_unet(
    blocks: Sequence[nn.Module], skip_weights: Tensor, layout: UNetLayout, x: Tensor, x0: Tensor,
    adapters: Sequence[nn.Module] | None = None, gates: Tensor | None = None,
) -> Tensor:
    """The blocks run in `layout.order`; each encoder output is saved; before each of the first
    `num_skips` decoder positions the most recently saved output is added back, scaled per dim
    by its row of `skip_weights`. With `adapters` (depth recurrence, model/recurrence.py),
    adapter i follows the block at position i.

    From position `two_lane_pos` on, the stream is copied into two lanes that blocks update
    with `forward_lanes` (see Block); skips are added to lane 0 only, and the output is the
    mean of the two lanes (PR #1529's dual lane, as in the record PR #1584).

    With `gates` (layer dropout, model/dynamic.py), a 0/1 tensor with one entry per position:
    the block at position i leaves its input unchanged where gates[i] is 0 (lerp: exactly the
    input at 0, exactly the block's output at 1), on both lanes."""
    order, encoder = layout.order, layout.num_encoder_layers

    def gated(pos: int, before: Tensor, after: Tensor) -> Tensor:
        return after if gates is None else torch.lerp(before, after, gates[pos].to(after.dtype))

    saved: list[Tensor] = []
    for pos in range(encoder):
        x = gated(pos, x, blocks[order[pos]](x, x0))
        if adapters is not None:
            x = adapters[pos](x)
        saved.append(x)
    lanes: tuple[Tensor, Tensor] | None = None
    for i, pos in enumerate(range(encoder, len(order))):
        block = blocks[order[pos]]
        if pos == layout.two_lane_pos:
            lanes = (x, x)
        skip = skip_weights[i].to(x.dtype)[None, None, :] * saved.pop() if i < layout.num_skips else None
        if lanes is None:
            x_in = x if skip is None else x + skip
            x = gated(pos, x_in, block(x_in, x0))
            if adapters is not None:
                x = adapters[pos](x)
        else:
            lane0 = lanes[0] if skip is None else lanes[0] + skip
            new0, new1 = block.forward_lanes(lane0, lanes[1], x0)
            lanes = (gated(pos, lane0, new0), gated(pos, lanes[1], new1))
    if lanes is not None:
        x = 0.5 * (lanes[0] + lanes[1])
    return x
