"""Depth recurrence (`model.recurrence`): blocks that run more than once per forward. Each
entry gives the order in which the blocks run (a list of block indices, the "virtual"
layers); the U-Net of model/residual.py runs over that order, its encoder being the first
half of it.

- `none`: every block once, in order (the baseline).
- `loop` (the records' depth recurrence, PR #1331/#1437 lineage, in PR #1584's stack): the
  blocks `start..end` run `extra_passes` more times in a row; the record loops 3-5 twice more
  (11 physical blocks, 17 virtual: encoder [0,1,2,3,4,5,3,4], decoder [5,3,4,5,6,...,10]).
  With `start_at > 0` the loop is switched on at that fraction of training, a training stage
  (tracks/stages.py) whose graph the untimed warmup compiles; before it the blocks run once.
- `shared` (PR #38, seed golf-pr38-depth-recurrent-qat): `model.num_layers` shared blocks,
  the whole stack run `loops` times (3 x 3 in the PR), with a rank-`lora_rank` adapter after
  each virtual layer: x + B(A(x)), B zero-initialised so that each adapter starts as the
  identity. PR #38 trains the shared blocks' matrices with Muon at matrix_lr / sqrt(loops)
  and the adapters with Adam (here at optim.scalar_lr).

The seed text does not say which tensor PR #38's "per-iteration LoRA deltas" act on; an
adapter on the residual stream after each virtual layer is the reading that matches "zero-init
up projection ensures delta starts as identity" and its rank-4 parameter budget.
"""

from __future__ import annotations

import dataclasses
import math

from torch import Tensor, nn

from underpar.config import bounded
from underpar.errors import ConfigError
from underpar.model.linear import CastedLinear
from underpar.registry import Registry

RECURRENCES: Registry[type] = Registry("recurrence")


@RECURRENCES.register("none")
@dataclasses.dataclass
class NoRecurrence:
    """Each block once."""

    def order(self, num_layers: int) -> list[int]:
        return list(range(num_layers))

    def stage_at(self) -> float | None:
        """The progress at which the recurrent order replaces the plain one (None: never, or
        from the start)."""
        return None

    def check_with(self, num_layers: int) -> None:
        pass

    def lr_scale(self) -> float:
        """The factor on the block matrices' Muon learning rate."""
        return 1.0

    def adapters(self, num_layers: int, dim: int) -> nn.ModuleList | None:
        return None


@RECURRENCES.register("loop")
@dataclasses.dataclass
class Loop(NoRecurrence):
    """Blocks start..end (inclusive) run 1 + extra_passes times in a row (the record's
    LOOP_START=3, LOOP_END=5, NUM_LOOPS=2, ENABLE_LOOPING_AT=0.35)."""

    start: int = bounded(3, 0)
    end: int = bounded(5, 0)
    extra_passes: int = bounded(2, 1)
    start_at: float = bounded(0.35, 0.0, 1.0)  # fraction of training; 0 = from the first step

    def order(self, num_layers: int) -> list[int]:
        segment = list(range(self.start, self.end + 1))
        return list(range(self.start)) + segment * (1 + self.extra_passes) + list(range(self.end + 1, num_layers))

    def stage_at(self) -> float | None:
        return self.start_at if self.start_at > 0 else None

    def check_with(self, num_layers: int) -> None:
        if not self.start <= self.end < num_layers:
            raise ConfigError(
                f"model.recurrence.start = {self.start} and end = {self.end} must satisfy "
                f"start <= end < model.num_layers = {num_layers}"
            )


@RECURRENCES.register("shared")
@dataclasses.dataclass
class Shared(NoRecurrence):
    """PR #38: the model's blocks are shared and the whole stack runs `loops` times, with a
    rank-`lora_rank` adapter per virtual layer (0 = no adapters)."""

    loops: int = bounded(3, 2)
    lora_rank: int = bounded(4, 0)

    def order(self, num_layers: int) -> list[int]:
        return list(range(num_layers)) * self.loops

    def lr_scale(self) -> float:
        return 1.0 / math.sqrt(self.loops)

    def adapters(self, num_layers: int, dim: int) -> nn.ModuleList | None:
        if self.lora_rank == 0:
            return None
        return nn.ModuleList(LoRAAdapter(dim, self.lora_rank) for _ in range(num_layers * self.loops))


class LoRAAdapter(nn.Module):
    """x + up(down(x)) with `up` zero-initialised: the identity until it trains."""

    def __init__(self, dim: int, rank: int):
        super().__init__()
        self.down = CastedLinear(dim, rank)
        self.up = CastedLinear(rank, dim, zero_init=True)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.up(self.down(x))
