"""Deep Chaos plans: which layers run in which mode in each sticky block (and, for the "mask"
and "slice" strategies, which heads and channel groups they keep), drawn by a seeded scheduler
that is deterministic per block. The controller that applies them is `underpar.tracks.chaos`."""

from __future__ import annotations

import dataclasses
import math
import random
from typing import TYPE_CHECKING, Any

import torch

from underpar.config import validate
from underpar.errors import ConfigError
from underpar.model import surgery
from underpar.model.surgery import LayerDims
from underpar.tracks.chaos_strategies import CHAOS_STRATEGIES

if TYPE_CHECKING:
    from underpar.tracks.chaos import ChaosConfig


@dataclasses.dataclass
class BlockPlan:
    """One block's layout: a mode per original layer and, for strategies "mask" and "slice",
    the kept units per layer (KV-head indices, MLP channel-group indices, hidden-group indices
    of the o_proj and down_proj outputs)."""

    block: int
    modes: list[str]
    kv_heads: dict[int, list[int]] = dataclasses.field(default_factory=dict)
    mlp_groups: dict[int, list[int]] = dataclasses.field(default_factory=dict)
    attn_hidden_groups: dict[int, list[int]] = dataclasses.field(default_factory=dict)
    mlp_hidden_groups: dict[int, list[int]] = dataclasses.field(default_factory=dict)
    mlp_group_size: int = 128
    hidden_group_size: int = 64
    # stub="mean": bias per removed run (by its first layer), set by the controller at the block's start
    stub_biases: dict[int, torch.Tensor] = dataclasses.field(default_factory=dict)
    # stub="mean_halves": bias per attn / mlp layer for the half it skips
    half_biases: dict[int, torch.Tensor] = dataclasses.field(default_factory=dict)

    def layers(self, *modes: str) -> list[int]:
        return [i for i, m in enumerate(self.modes) if m in modes]

    @property
    def active_fraction(self) -> float:
        victims = [m for m in self.modes if m != "sacred"]
        return sum(m != "dead" for m in victims) / len(victims) if victims else 1.0

    def summary(self) -> dict[str, Any]:
        """Counts per mode and the layer lists, for logs."""
        out: dict[str, Any] = {"block": self.block, "active_fraction": round(self.active_fraction, 4)}
        for mode in surgery.MODES:
            out[f"n_{mode}"] = self.modes.count(mode)
        out["layers"] = {mode: self.layers(mode) for mode in surgery.MODES if mode in self.modes}
        return out


def resolve_layers(indices: list[int], num_layers: int) -> list[int]:
    """Negative indices count from the end; out-of-range ones are an error."""
    out = []
    for i in indices:
        if not -num_layers <= i < num_layers:
            raise ConfigError(f"method.sacred_layers: layer {i} does not exist in a model with {num_layers} layers "
                              f"(0 to {num_layers - 1}, or -1 to -{num_layers} from the end)")
        if i % num_layers not in out:
            out.append(i % num_layers)
    return sorted(out)


class ChaosScheduler:
    """Deterministic plans: block b depends only on `cfg.seed` and the blocks before it (the
    on/off streak counters), computed in order and cached. The mode draws do not depend on the
    strategy, so "hoist" and "mask" runs with one seed pick the same layers.

    Active count per block: uniform integer in [ceil(n*min), floor(n*max)] of the n victims
    (strictly inside the configured fractions; if that range is empty, the nearest integer to
    n*(min+max)/2). Streak rules: a victim off `force_on_after` blocks in a row is on in the
    next block; one on `force_off_after` blocks in a row is off. Forced-on layers raise the
    target up to the maximum; the fraction bounds win in the (rare) case they cannot all hold.
    """

    def __init__(self, num_layers: int, cfg: ChaosConfig, dims: LayerDims | None = None):
        validate(cfg)
        self.cfg, self.dims, self.num_layers = cfg, dims, num_layers
        self.sacred = resolve_layers(cfg.sacred_layers, num_layers)
        self.victims = [i for i in range(num_layers) if i not in self.sacred]
        n = len(self.victims)
        if cfg.active_count == "round":  # the published bounds
            lo = max(1, round(n * cfg.active_fraction_min))
            hi = max(lo, round(n * cfg.active_fraction_max))
        else:
            lo = math.ceil(n * cfg.active_fraction_min - 1e-9)
            hi = math.floor(n * cfg.active_fraction_max + 1e-9)
            if lo > hi:
                lo = hi = round(n * (cfg.active_fraction_min + cfg.active_fraction_max) / 2)
        self.active_range = (lo, hi)
        self._plans: list[BlockPlan] = []
        self._on = {v: 0 for v in self.victims}  # streaks after the last computed block
        self._off = {v: 0 for v in self.victims}

    def plan(self, block: int) -> BlockPlan:
        if block < 0:
            raise ValueError(f"block must be >= 0, got {block}")
        while len(self._plans) <= block:
            self._plans.append(self._next(len(self._plans)))
        return self._plans[block]

    def rng(self, block: int, stream: str) -> random.Random:
        """Block `block`'s seeded draws of one kind ("layers"; a strategy uses its own stream)."""
        return random.Random(f"underpar.chaos/{self.cfg.seed}/{block}/{stream}")

    def _choose_active(self, rng: random.Random) -> set[int]:
        cfg, (lo, hi) = self.cfg, self.active_range
        target = rng.randint(lo, hi)
        forced_on = sorted((v for v in self.victims if self._off[v] >= cfg.force_on_after),
                           key=lambda v: -self._off[v])
        forced_off = sorted((v for v in self.victims if self._on[v] >= cfg.force_off_after
                             and v not in forced_on), key=lambda v: self._on[v])
        free = [v for v in self.victims if v not in forced_on and v not in forced_off]
        if cfg.active_count == "round":  # published: all forced-on, then fill up to the target
            return set(forced_on) | set(rng.sample(free, min(max(0, target - len(forced_on)), len(free))))
        target = min(max(target, len(forced_on)), hi)
        active = forced_on[:target]
        active += rng.sample(free, min(target - len(active), len(free)))
        active += forced_off[: max(0, lo - len(active))]
        return set(active)

    def _next(self, block: int) -> BlockPlan:
        cfg = self.cfg
        rng = self.rng(block, "layers")
        active = self._choose_active(rng)
        names, probs = zip(*cfg.mode_probabilities().items())
        modes = ["sacred"] * self.num_layers
        for v in self.victims:
            modes[v] = rng.choices(names, probs)[0] if v in active else "dead"
            self._on[v], self._off[v] = (self._on[v] + 1, 0) if v in active else (0, self._off[v] + 1)
        plan = BlockPlan(block, modes, mlp_group_size=cfg.mlp_group_size,
                         hidden_group_size=cfg.hidden_group_size)
        sample = CHAOS_STRATEGIES[cfg.strategy].sample
        if sample is not None:
            sample(self, plan)
        return plan
