"""Deep Chaos strategies: how a block's plan becomes model structure, as registered apply /
undo pairs (`method.strategy = "hoist" | "mask" | "slice"`).

A strategy is `apply(model, plan, cfg)`, which edits the model for one block, `undo(model)`,
which restores it exactly (a no-op when nothing is applied), and optionally
`sample(scheduler, plan)`, which draws the strategy's own part of each plan from the
scheduler's seeded streams. Adding one is those functions and a registration;
tests/test_registries.py checks that undo restores the model's outputs exactly.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from torch import nn

from underpar.errors import ConfigError
from underpar.model import surgery
from underpar.registry import Registry

if TYPE_CHECKING:
    from underpar.tracks.chaos import BlockPlan, ChaosConfig, ChaosScheduler


@dataclasses.dataclass(frozen=True)
class Strategy:
    """One strategy's functions (see the module docstring)."""

    apply: Callable[[nn.Module, BlockPlan, ChaosConfig], Any]
    undo: Callable[[nn.Module], Any]
    sample: Callable[[ChaosScheduler, BlockPlan], None] | None = None


CHAOS_STRATEGIES: Registry[Strategy] = Registry("chaos_strategy")


# ---------------------------------------------------------------------------------- hoist
# Dead layers leave the layer list (a frozen bias stub per removed run) and attn / mlp layers
# run one half, so removed computation costs nothing. Active layers run at full width.


def hoist(model: nn.Module, plan: BlockPlan, cfg: ChaosConfig) -> None:
    surgery.hoist(model, plan, skip_identity=cfg.hoist_identity, stub_std=cfg.stub_std, seed=cfg.seed,
                  stub_biases=plan.stub_biases, half_biases=plan.half_biases)


CHAOS_STRATEGIES.register("hoist")(Strategy(apply=hoist, undo=surgery.restore))


# ---------------------------------------------------------------------------------- mask
# The graph stays whole; forward hooks zero KV heads, MLP channel groups and output groups
# (and whole halves / layers that sit out), as the published Deep Chaos code does.


def mask(model: nn.Module, plan: BlockPlan, cfg: ChaosConfig) -> None:
    surgery.apply_masks(model, plan, skip_identity=cfg.hoist_identity, in_eval=cfg.mask_in_eval)


def sample_masks(scheduler: ChaosScheduler, plan: BlockPlan) -> None:
    """Kept KV heads and output groups of each attention half that runs; kept channel groups
    (two stages, as published: a U(min, max) share of the groups, then a U(core_min, core_max)
    share of those) and output groups of each MLP half that runs."""
    if scheduler.dims is None:
        raise ConfigError("strategy 'mask' needs the model's layer dims (ChaosScheduler(..., dims=))")
    cfg, d, rng = scheduler.cfg, scheduler.dims, scheduler.rng(plan.block, "masks")

    def keep(n: int, lo: float, hi: float, among: list[int] | None = None) -> list[int]:
        pool = list(range(n)) if among is None else among
        count = min(len(pool), max(1, round(len(pool) * rng.uniform(lo, hi))))
        return sorted(rng.sample(pool, count))

    mlp_groups = math.ceil(d.intermediate_size / cfg.mlp_group_size)
    hidden_groups = math.ceil(d.hidden_size / cfg.hidden_group_size)
    for i, mode in enumerate(plan.modes):
        if mode in ("both", "attn"):
            plan.kv_heads[i] = keep(d.num_kv_heads, cfg.kv_heads_keep_min, cfg.kv_heads_keep_max)
            plan.attn_hidden_groups[i] = keep(hidden_groups, cfg.hidden_keep_min, cfg.hidden_keep_max)
        if mode in ("both", "mlp"):
            first = keep(mlp_groups, cfg.mlp_channels_keep_min, cfg.mlp_channels_keep_max)
            plan.mlp_groups[i] = keep(mlp_groups, cfg.mlp_core_keep_min, cfg.mlp_core_keep_max, among=first)
            plan.mlp_hidden_groups[i] = keep(hidden_groups, cfg.hidden_keep_min, cfg.hidden_keep_max)


CHAOS_STRATEGIES.register("mask")(Strategy(apply=mask, undo=surgery.remove_masks, sample=sample_masks))


# ---------------------------------------------------------------------------------- slice
# Hoisting plus the mask plan's kept units physically sliced out of the weights: dead layers
# leave the graph, and active layers run smaller matmuls over their kept heads, channel groups
# and output groups (what the write-up describes; the published hoist runs kept layers at full
# width). Same plans, same numbers as "mask" up to rounding (see model/sliced.py). The controller
# runs the sliced projections on packed copies instead with `slice_form = "pack"` (chaos_pack.py).


def hoist_sliced(model: nn.Module, plan: BlockPlan, cfg: ChaosConfig) -> None:
    surgery.hoist(model, plan, skip_identity=cfg.hoist_identity, stub_std=cfg.stub_std, seed=cfg.seed,
                  stub_biases=plan.stub_biases, half_biases=plan.half_biases, sliced=True)


CHAOS_STRATEGIES.register("slice")(Strategy(apply=hoist_sliced, undo=surgery.restore, sample=sample_masks))
