"""Learning-rate and momentum schedules.

LR schedules are pure functions of training progress in [0, 1] (elapsed / budget under a
wallclock cap, the step's place in a run of known length otherwise), never of a step count
that a cap can truncate. Each is a small parameter dataclass registered in SCHEDULES; a
config selects one with `variant(SCHEDULES, "name")` and calls the instance:
`schedule(progress) -> multiplier of base_lr`. Adding one is a dataclass, a `__call__` and
a registration; tests/test_registries.py checks it.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Protocol

from underpar.config import bounded
from underpar.errors import ConfigError
from underpar.registry import Registry


class Schedule(Protocol):
    def __call__(self, progress: float) -> float:
        """progress in [0, 1] -> LR multiplier (1.0 = the configured learning rate)."""
        ...


SCHEDULES: Registry[type[Schedule]] = Registry("schedule")


def _clamp(progress: float) -> float:
    return min(max(progress, 0.0), 1.0)


@SCHEDULES.register("warmdown")
@dataclasses.dataclass
class Warmdown:
    """The baseline shape: 1.0, then linear to 0 over the last `warmdown_fraction` of
    training; optionally a linear warmup from 0 over the first `warmup_fraction`. The
    baseline warms down over its last 1,200 of 13,780 steps on 8xH100, about 8.7% of the run."""

    warmdown_fraction: float = bounded(0.087, 0.0, 1.0)
    warmup_fraction: float = bounded(0.0, 0.0, 1.0)

    def check(self) -> None:
        if self.warmup_fraction + self.warmdown_fraction > 1.0:
            raise ConfigError(
                f"optim.schedule.warmup_fraction ({self.warmup_fraction}) + "
                f"optim.schedule.warmdown_fraction ({self.warmdown_fraction}) must not exceed 1"
            )

    def __call__(self, progress: float) -> float:
        progress = _clamp(progress)
        multiplier = 1.0
        if self.warmup_fraction > 0 and progress < self.warmup_fraction:
            multiplier = progress / self.warmup_fraction
        remaining = 1.0 - progress
        if self.warmdown_fraction > 0 and remaining < self.warmdown_fraction:
            multiplier = min(multiplier, remaining / self.warmdown_fraction)
        return multiplier


@SCHEDULES.register("cosine")
@dataclasses.dataclass
class Cosine:
    """Linear warmup from 0 over the first `warmup_fraction`, then a half cosine from 1.0
    down to `min_lr_ratio` at the end of training."""

    warmup_fraction: float = bounded(0.03, 0.0, 1.0)
    min_lr_ratio: float = bounded(0.0, 0.0, 1.0)

    def __call__(self, progress: float) -> float:
        progress = _clamp(progress)
        if progress < self.warmup_fraction:
            return progress / self.warmup_fraction
        decay = (progress - self.warmup_fraction) / (1.0 - self.warmup_fraction) if self.warmup_fraction < 1 else 1.0
        cosine = 0.5 * (1.0 + math.cos(math.pi * decay))
        return self.min_lr_ratio + (1.0 - self.min_lr_ratio) * cosine


def muon_momentum(
    step: int, warmup_steps: int = 500, start: float = 0.85, end: float = 0.95
) -> float:
    """Muon momentum, linear from `start` to `end` over the first `warmup_steps` steps.

    The baseline counts steps here: the warmup is short and fixed, so a wallclock cap
    never truncates it."""
    frac = min(step / warmup_steps, 1.0) if warmup_steps > 0 else 1.0
    return (1.0 - frac) * start + frac * end
