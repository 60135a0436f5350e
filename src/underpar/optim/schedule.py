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
        return _cosine(progress, self.warmup_fraction, self.min_lr_ratio, cycles=1)


def _cosine(progress: float, warmup_fraction: float, min_lr_ratio: float, cycles: int) -> float:
    """Linear warmup, then `cycles` equal half cosines from 1.0 down to `min_lr_ratio`."""
    progress = _clamp(progress)
    if progress < warmup_fraction:
        return progress / warmup_fraction
    decay = (progress - warmup_fraction) / (1.0 - warmup_fraction) if warmup_fraction < 1 else 1.0
    cycle = min(int(decay * cycles), cycles - 1)  # the end of training ends the last cycle
    return _lifted(_half_cosine(decay * cycles - cycle), min_lr_ratio)


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


# The log's other schedules (Phase 1 #5, N5 and the NF batch of Phase 4). The log names them
# and gives one line each; where it gives no number the default below is ours and says so.


@SCHEDULES.register("cosine_cycles")
@dataclasses.dataclass
class CosineCycles:
    """The log's "Cosine 2-cycle" (Phase 1 #5: two cosine decay cycles instead of one; 1.7383,
    +0.127, much worse): `warmup_fraction` as `cosine`, then `cycles` equal half cosines from
    1.0 down to `min_lr_ratio`, each restarting at 1.0. cycles = 1 is `cosine` exactly."""

    cycles: int = bounded(2, 1)
    warmup_fraction: float = bounded(0.03, 0.0, 1.0)
    min_lr_ratio: float = bounded(0.0, 0.0, 1.0)

    def __call__(self, progress: float) -> float:
        return _cosine(progress, self.warmup_fraction, self.min_lr_ratio, self.cycles)


@SCHEDULES.register("golden_floor")
@dataclasses.dataclass
class GoldenFloor(Cosine):
    """The log's N5 "Golden Ratio min_lr": the cosine baseline with its LR floor at 0.382 (its
    run scored 4.1069 from an indentation bug of the log's patching, so it was never measured)."""

    min_lr_ratio: float = bounded(0.382, 0.0, 1.0)


@SCHEDULES.register("whale_dive")
@dataclasses.dataclass
class WhaleDive:
    """The log's NF2 "Whale Dive LR" (3 dive cycles with sharp recoveries; 1.6487, +0.037 worse):
    `dives` equal cycles, each a half cosine from 1.0 down to `min_lr_ratio` over the first
    1 - `recovery_fraction` of the cycle and a linear climb back to 1.0 over the rest; the last
    dive has no recovery, so training ends at the floor (a run that ended on a climb would
    export weights taken at the peak LR). The log gives only the 3 dives; the floor is its
    min_lr_frac (0.1, as tidal); the recovery's 10% of a cycle is ours."""

    dives: int = bounded(3, 1)
    recovery_fraction: float = bounded(0.1, 0.0, 0.9)
    min_lr_ratio: float = bounded(0.1, 0.0, 1.0)

    def __call__(self, progress: float) -> float:
        position = _clamp(progress) * self.dives
        dive = min(int(position), self.dives - 1)
        x = position - dive  # within this dive's cycle, in [0, 1]
        descent = 1.0 if dive == self.dives - 1 else 1.0 - self.recovery_fraction
        if x <= descent:  # x = 1 only at the end of the last dive
            return _lifted(_half_cosine(x / descent), self.min_lr_ratio)
        return _lifted((x - descent) / self.recovery_fraction, self.min_lr_ratio)

    def final_decay_start(self) -> float:
        """Where the last dive begins (between grid points for 3 dives: see decay_start)."""
        return (self.dives - 1) / self.dives


@SCHEDULES.register("circadian")
@dataclasses.dataclass
class Circadian:
    """The log's NF3 "Circadian LR" (day/night sine oscillation overlaid on cosine; 1.6141,
    neutral): `cosine` (warmup_fraction, min_lr_ratio) times a day/night factor
    1 - amplitude * (1 - cos(2 pi days progress)) / 2, which is 1 at each "noon" (the start
    included) and 1 - amplitude at each "midnight". The log gives no numbers: 4 days and an
    amplitude of 0.3 are ours; the 0.1 floor is its min_lr_frac."""

    days: int = bounded(4, 1)
    amplitude: float = bounded(0.3, 0.0, 1.0)
    warmup_fraction: float = bounded(0.03, 0.0, 1.0)
    min_lr_ratio: float = bounded(0.1, 0.0, 1.0)

    def __call__(self, progress: float) -> float:
        progress = _clamp(progress)
        day_night = 1.0 - self.amplitude * 0.5 * (1.0 - math.cos(2.0 * math.pi * self.days * progress))
        return Cosine(self.warmup_fraction, self.min_lr_ratio)(progress) * day_night


@SCHEDULES.register("cosmological_cooling")
@dataclasses.dataclass
class CosmologicalCooling:
    """The log's NF4 "Cosmological Cooling" (lr ~ 1/sqrt(1 + alpha*step), the Big Bang cooling
    law; 1.6129, neutral): 1 / sqrt(1 + alpha * progress), progress in place of the step (a
    wallclock cap cannot truncate it). The log gives no alpha: the default 99 cools to 0.1 at
    the end of training, the log's min_lr_frac."""

    alpha: float = bounded(99.0, 0.0)

    def __call__(self, progress: float) -> float:
        return 1.0 / math.sqrt(1.0 + self.alpha * _clamp(progress))


def decay_start(schedule: Schedule, resolution: int = 10_000) -> float:
    """Where the schedule's final decay begins: the last progress (on a grid of `resolution`
    steps) at which it is at its peak, e.g. 0.913 for the default warmdown, 0.382 for tidal,
    11/19 for breathing; 1.0 for a schedule that never decays. A schedule whose last peak
    falls between grid points says where itself (`final_decay_start`)."""
    if hasattr(schedule, "final_decay_start"):
        return schedule.final_decay_start()
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
