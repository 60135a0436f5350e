"""Fine-tuning methods: one controller protocol for full fine-tuning, LISA and Deep Chaos.

A method is a parameter dataclass registered in METHODS (`FinetuneConfig.method` is
`variant(METHODS, "full")`, so `--set method=chaos`, `--set method.sticky_interval=10`); its
`controller(model)` builds what the training loop drives:

    ctl = cfg.method.controller(model)
    ctl.use_calibration(first_training_batches)  # what a method may measure the model on
    for step in range(steps):
        layout = ctl.begin(step, optimizer)  # a new block's layout (logged), or None mid-block
        ...                                   # forward, backward, clip ctl.trainable_parameters()
        # at a block's end (ctl.block_of(step + 1) changes): held-out loss of the full model
        # inside `with ctl.restored():`, and of the block's network when
        # ctl.trains_a_different_network (Deep Chaos)
    ctl.end(optimizer)                        # the full model again, original requires_grad

Adding a method is a config dataclass with `controller()`, a Controller subclass and one
registration; tests/test_registries.py checks that a block begins and ends cleanly.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from underpar.registry import Registry

if TYPE_CHECKING:
    from underpar.runs.rundir import RunDir

METHODS: Registry[type[MethodConfig]] = Registry("finetune_method")


class Controller:
    """Drives one method on one model. This base is full fine-tuning: every parameter trains
    and nothing changes between steps."""

    # Whether the network that trains inside a block differs from the full model that is saved
    # and evaluated (Deep Chaos: hoisted or masked). The loop then logs both networks' held-out
    # losses, each under its own name.
    trains_a_different_network = False

    def __init__(self, model: nn.Module):
        self.model = model
        self.calibration: list[dict[str, torch.Tensor]] = []

    def use_calibration(self, batches: list[dict[str, torch.Tensor]]) -> None:
        """Training micro-batches a method may measure the model on (Deep Chaos mean stubs)."""
        self.calibration = batches

    def block_of(self, step: int) -> int:
        """The block of optimizer step `step`; full fine-tuning is one block."""
        return 0

    @contextlib.contextmanager
    def restored(self) -> Iterator[nn.Module]:
        """The full model (what is saved and evaluated) for the duration of the block."""
        yield self.model

    def begin(self, step: int, optimizer: torch.optim.Optimizer | None = None) -> list[Any] | None:
        """Called before optimizer step `step` (0-based). When the step starts a new block, set
        up that block (what trains, what runs) and return its layout for the log (JSON-able);
        otherwise return None."""
        return None

    def end(self, optimizer: torch.optim.Optimizer | None = None) -> None:
        """Put the full model back: original structure, `requires_grad` and optimizer state."""

    def trainable_parameters(self) -> list[torch.Tensor]:
        """What trains in the current block."""
        return [p for p in self.model.parameters() if p.requires_grad]

    def report(self, layouts: list[list[Any]], run_dir: RunDir) -> None:
        """Method-specific figures in the run directory, from the layouts `begin` returned."""


class MethodConfig:
    """Base of the method configs (each a dataclass registered in METHODS)."""

    def controller(self, model: nn.Module) -> Controller:
        raise NotImplementedError

    def check_with(self, train: Any) -> None:
        """Cross-field checks against the training settings (`train.*`); validation calls it."""


@METHODS.register("full")
@dataclasses.dataclass
class FullConfig(MethodConfig):
    """Full fine-tuning: every parameter, every step. No settings of its own."""

    def controller(self, model: nn.Module) -> Controller:
        return Controller(model)
