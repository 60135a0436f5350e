"""Structure experiments of the 131-run log's Phase 3 (`model.structure.*`), built so that
torch.compile(fullgraph=True) traces them (seed golf-experiment-log-131-runs.txt: there every
one of them crashed or did not train):

    layer_dropout    U1  each block skipped with this probability, drawn per optimizer step
    share_group      U2  consecutive layers share one block's parameters, in groups of this size
    grow             U3  progressive growing: start with a few layers, add one at set progresses
    attention_passes U4  attention recycling: each block's attention sublayer runs this often
    mirror           U5  this fraction of each training micro-batch's sequences reversed
    prune_heads_to   U6  at `prune_at`, every block keeps only this many attention heads

How each stays compile-safe: layer dropout is a [positions] 0/1 tensor (`layer_gates`) that
the compiled graph reads, redrawn eagerly before every step (GPT.begin_step) from a generator
of (seed, step) - nothing data-dependent in Python, nothing recompiles, a resumed run draws
what an uninterrupted one would. Sharing and recycling are fixed structure (one graph).
Growing is a list of training stages (underpar.stages), one graph per depth, all compiled in
the untimed warmup. Head pruning is a stage that fills a per-head 0/1 mask buffer (one graph
for both stages; the mask is saved with the weights). Mirror training draws its rows inside the graph from torch's generator,
which the run seeds, checkpoints and restores after the warmup (as model.loss's token dropout).

Where the log gives no rule, ours is named in the field's comment.
"""

from __future__ import annotations

import dataclasses
import math
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from underpar.config import bounded, items, variant
from underpar.errors import ConfigError
from underpar.registry import Registry

if TYPE_CHECKING:
    from underpar.model.config import GPTConfig

GROWTH: Registry[type] = Registry("growth")


@GROWTH.register("none")
@dataclasses.dataclass
class NoGrowth:
    """Every layer from the start."""

    def start_depth(self, num_layers: int) -> int:
        return num_layers

    def schedule(self, num_layers: int) -> list[float]:
        """The progress at which each further layer is added (one entry per added layer)."""
        return []

    def check_with(self, num_layers: int) -> None:
        pass


@GROWTH.register("progressive")
@dataclasses.dataclass
class Progressive(NoGrowth):
    """Start with `start_layers` of the model's layers (the first ones) and add the next one
    every `every` of training, or at the progresses listed in `at` (one per added layer).
    The log's U3 (3 layers, one more every 60 of its 240 steps) is every = 0.25; it never
    reached 9 layers, so here a schedule that leaves layers unused is refused. Progress, not
    steps: a wallclock cap cannot truncate it (the log's Phase 7 lesson)."""

    start_layers: int = bounded(3, 1)
    every: float = bounded(0.1, 0.0, 1.0)
    at: list[float] = items([])

    def start_depth(self, num_layers: int) -> int:
        return self.start_layers

    def schedule(self, num_layers: int) -> list[float]:
        if self.at:
            return [float(a) for a in self.at]
        return [round(k * self.every, 9) for k in range(1, num_layers - self.start_layers + 1)]

    def check_with(self, num_layers: int) -> None:
        added = num_layers - self.start_layers
        if added < 1:
            raise ConfigError(f"model.structure.grow.start_layers = {self.start_layers} leaves nothing to grow: it "
                              f"must be below model.num_layers = {num_layers}")
        if self.at and len(self.at) != added:
            raise ConfigError(f"model.structure.grow.at lists {len(self.at)} progresses; growing from "
                              f"{self.start_layers} to {num_layers} layers adds {added} (one each)")
        points = self.schedule(num_layers)
        if not all(0 < a < 1 for a in points) or any(b <= a for a, b in zip(points, points[1:])):
            hint = "" if self.at else f" (every = {self.every} x {added} added layers must stay below 1)"
            raise ConfigError(f"model.structure.grow: layers are added at {points}; each must be in (0, 1), "
                              f"increasing, so that every layer trains{hint}")


@dataclasses.dataclass
class StructureConfig:
    # U1: probability that a block is skipped (its residual update gated to 0) in a training
    # step; the same draw for every micro-step of the step. No rescaling of kept blocks (the
    # log "skips" layers); evaluation runs every block.
    layer_dropout: float = bounded(0.0, 0.0, 0.9)
    # U2: layers i*g .. i*g+g-1 run one shared block (g = share_group; the log's 3); the
    # depth stays model.num_layers, the parameters are those of ceil(num_layers / g) blocks.
    share_group: int = bounded(1, 1)
    # U3: progressive growing (none | progressive), training stages.
    grow: NoGrowth = variant(GROWTH, "none")
    # U4: the attention sublayer runs this many times per block, same weights, each pass
    # added to the stream (the log's "run attention twice per layer": 2).
    attention_passes: int = bounded(1, 1, 4)
    # U5: fraction of each training micro-batch's sequences read backwards (exactly
    # round(fraction * rows) of them, drawn anew per call; the log's 0.5).
    mirror: float = bounded(0.0, 0.0, 1.0)
    # U6: heads each block keeps from `prune_at` on (0: no pruning; the log: 16 -> 8). Our
    # rule, the log gives none: the heads whose output-projection columns have the largest
    # norm are kept; the others are masked out and their projection columns zeroed, so the
    # exported model is the pruned one.
    prune_heads_to: int = bounded(0, 0)
    prune_at: float = bounded(0.42, 0.0, 0.99)  # the log's step 100 of 240

    def order(self, num_layers: int) -> list[int]:
        """The block each layer runs (every layer once; shared groups repeat a block)."""
        return [layer // self.share_group for layer in range(num_layers)]

    def num_blocks(self, num_layers: int) -> int:
        return math.ceil(num_layers / self.share_group)

    def check_with(self, cfg: GPTConfig) -> None:
        """Checks that need the rest of the model's config (called by GPTConfig.check)."""
        from underpar.model.recurrence import RECURRENCES

        recurrence = RECURRENCES.name_of(cfg.recurrence)
        growing = GROWTH.name_of(self.grow) != "none"
        for name, on in (("share_group", self.share_group > 1), ("grow", growing)):
            if on and recurrence != "none":
                raise ConfigError(f"model.structure.{name} does not combine with model.recurrence = {recurrence!r} "
                                  "(both decide which block runs at each layer); use one of them")
            if on and cfg.residual.two_lane_start >= 0:
                raise ConfigError(f"model.structure.{name} does not combine with model.residual.two_lane_start "
                                  "(the lanes are placed by block index); set two_lane_start = -1")
        if self.attention_passes > 1 and (cfg.residual.parallel_start >= 0 or cfg.residual.two_lane_start >= 0):
            raise ConfigError("model.structure.attention_passes > 1 needs sequential blocks: set "
                              "model.residual.parallel_start = -1 and two_lane_start = -1")
        heads = cfg.attention.num_heads
        if self.prune_heads_to and not 1 <= self.prune_heads_to < heads:
            raise ConfigError(f"model.structure.prune_heads_to = {self.prune_heads_to} must be in "
                              f"[1, {heads - 1}] (model.attention.num_heads = {heads}); 0 turns pruning off")
        self.grow.check_with(cfg.num_layers)
        encoder = cfg.residual.num_encoder_layers(cfg.num_layers)
        if growing and self.grow.start_depth(cfg.num_layers) < encoder:
            raise ConfigError(f"model.structure.grow.start_layers = {self.grow.start_depth(cfg.num_layers)} is fewer "
                              f"than the {encoder} encoder layers (model.residual.encoder_layers = "
                              f"{cfg.residual.encoder_layers}; -1 = half the layers)")


def step_generator(seed: int, step: int) -> torch.Generator:
    """The generator of optimizer step `step`'s layer-dropout draw: a function of (seed, step)
    only, as optim/dynamics.step_generator, on a stream of its own (the salt) so that its
    draws are not those of a gradient trick at the same step."""
    return torch.Generator().manual_seed(((seed * 1_000_003 + step) * 31 + 0x1D) % (1 << 63))


def draw_layer_gates(seed: int, step: int, positions: int, p: float) -> Tensor:
    """[positions] float32: 0 where a block is skipped (probability p), 1 where it runs."""
    return (torch.rand(positions, generator=step_generator(seed, step)) >= p).float()


def num_mirrored(rows: int, fraction: float) -> int:
    """How many of a micro-batch's `rows` sequences mirror training reverses (half up)."""
    return min(int(fraction * rows + 0.5), rows)


def mirror_batch(input_ids: Tensor, target_ids: Tensor, fraction: float) -> tuple[Tensor, Tensor]:
    """Reverse exactly `num_mirrored` rows, drawn uniformly (torch's generator). A row holds
    tokens t0..tT as inputs t0..t(T-1) and targets t1..tT; read backwards, its inputs are the
    flipped targets and its targets the flipped inputs."""
    rows = input_ids.size(0)
    count = num_mirrored(rows, fraction)
    if count == 0:
        return input_ids, target_ids
    if count == rows:
        flip = torch.ones(rows, dtype=torch.bool, device=input_ids.device)
    else:
        chosen = torch.rand(rows, device=input_ids.device).topk(count).indices
        flip = torch.zeros(rows, dtype=torch.bool, device=input_ids.device).index_fill(0, chosen, True)
    flip = flip[:, None]
    return (torch.where(flip, target_ids.flip(1), input_ids), torch.where(flip, input_ids.flip(1), target_ids))
