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


def _lifted(shape: float, floor: float) -> float:
    """A shape in [0, 1] lifted onto [floor, 1], as the experiment log applies its min_lr_frac."""
    return floor + (1.0 - floor) * shape


def _half_cosine(x: float) -> float:
    """1 at x = 0 down to 0 at x = 1."""
    return 0.5 * (1.0 + math.cos(math.pi * x))


@SCHEDULES.register("warmdown")
@dataclasses.dataclass
class Warmdown:
    """The baseline shape: 1.0, then linear to 0 over the last `warmdown_fraction` of
    training (never below `min_lr_ratio`); optionally a linear warmup from 0 over the first
    `warmup_fraction`. The baseline warms down over its last 1,200 of 13,780 steps on
    8xH100, about 8.7% of the run."""

    warmdown_fraction: float = bounded(0.087, 0.0, 1.0)
    warmup_fraction: float = bounded(0.0, 0.0, 1.0)
    # The LR floor, as the records apply it (0.10 there): during the warmdown the multiplier
    # is max(linear, min_lr_ratio), i.e. linear to the floor, then flat at it.
    min_lr_ratio: float = bounded(0.0, 0.0, 1.0)

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
            multiplier = min(multiplier, max(remaining / self.warmdown_fraction, self.min_lr_ratio))
        return multiplier


@SCHEDULES.register("cosine")
@dataclasses.dataclass
class Cosine:
    """Linear warmup from 0 over the first `warmup_fraction`, then a half cosine from 1.0
    down to `min_lr_ratio` (the LR floor) at the end of training."""

    warmup_fraction: float = bounded(0.03, 0.0, 1.0)
    min_lr_ratio: float = bounded(0.0, 0.0, 1.0)

    def __call__(self, progress: float) -> float:
        progress = _clamp(progress)
        if progress < self.warmup_fraction:
            return progress / self.warmup_fraction
        decay = (progress - self.warmup_fraction) / (1.0 - self.warmup_fraction) if self.warmup_fraction < 1 else 1.0
        return _lifted(_half_cosine(decay), self.min_lr_ratio)


@SCHEDULES.register("tidal")
@dataclasses.dataclass
class Tidal:
    """The 131-run log's TIDAL_LR ("golden ratio": 38.2% warmup, 61.8% decay): linear from
    `min_lr_ratio` up to 1.0 over the first `warmup_fraction`, then a half cosine from 1.0
    down to `min_lr_ratio` at the end. Exactly the log's lr_mul (min_lr_frac 0.1, both phases
    lifted onto [floor, 1]). The log counted progress as step / ITERATIONS with ITERATIONS=400
    while ~240-276 steps fit its 600 s cap, so its runs stopped about two thirds down the
    cosine; here progress is elapsed / budget and the cosine ends with the budget."""

    warmup_fraction: float = bounded(0.382, 0.0, 1.0)
    min_lr_ratio: float = bounded(0.1, 0.0, 1.0)

    def __call__(self, progress: float) -> float:
        progress = _clamp(progress)
        if progress < self.warmup_fraction:
            return _lifted(progress / self.warmup_fraction, self.min_lr_ratio)
        if self.warmup_fraction >= 1.0:
            return 1.0
        decay = (progress - self.warmup_fraction) / (1.0 - self.warmup_fraction)
        return _lifted(_half_cosine(decay), self.min_lr_ratio)


@SCHEDULES.register("breathing")
@dataclasses.dataclass
class Breathing:
    """The 131-run log's BREATHING_LR, a 4-7-8 breath over 19 parts: inhale (linear from
    `min_lr_ratio` to 1.0) over the first 4/19 (~21%), hold at 1.0 for the next 7/19 (~37%),
    exhale (half cosine from 1.0 to `min_lr_ratio`) over the last 8/19 (~42%). Exactly the
    log's lr_mul (min_lr_frac 0.1); it scored 1.5961 against tidal's 1.5906 (NF1, N2) and lost
    to tidal again with parallel blocks (C12)."""

    inhale_fraction: float = bounded(4 / 19, 0.0, 1.0)
    hold_fraction: float = bounded(7 / 19, 0.0, 1.0)
    min_lr_ratio: float = bounded(0.1, 0.0, 1.0)

    def check(self) -> None:
        if self.inhale_fraction + self.hold_fraction > 1.0:
            raise ConfigError(
                f"optim.schedule.inhale_fraction ({self.inhale_fraction}) + "
                f"optim.schedule.hold_fraction ({self.hold_fraction}) must not exceed 1"
            )

    def __call__(self, progress: float) -> float:
        progress = _clamp(progress)
        exhale_start = self.inhale_fraction + self.hold_fraction
        if progress < self.inhale_fraction:
            return _lifted(progress / self.inhale_fraction, self.min_lr_ratio)
        if progress < exhale_start or exhale_start >= 1.0:
            return 1.0
        return _lifted(_half_cosine((progress - exhale_start) / (1.0 - exhale_start)), self.min_lr_ratio)


def decay_start(schedule: Schedule, resolution: int = 10_000) -> float:
    """Where the schedule's final decay begins: the last progress (on a grid of `resolution`
    steps) at which it is at its peak, e.g. 0.913 for the default warmdown, 0.382 for tidal,
    11/19 for breathing; 1.0 for a schedule that never decays."""
    values = [schedule(i / resolution) for i in range(resolution + 1)]
    peak = max(values)
    return max(i for i, v in enumerate(values) if v >= peak) / resolution


def muon_momentum(
    step: int, warmup_steps: int = 500, start: float = 0.85, end: float = 0.95
) -> float:
    """Muon momentum, linear from `start` to `end` over the first `warmup_steps` steps.

    The baseline counts steps here: the warmup is short and fixed, so a wallclock cap
    never truncates it."""
    frac = min(step / warmup_steps, 1.0) if warmup_steps > 0 else 1.0
    return (1.0 - frac) * start + frac * end
