"""Learning-rate and momentum schedules.

LR schedules are pure functions of training progress in [0, 1] (elapsed / budget under a
wallclock cap), never of a step count that the cap can truncate. Every entry of SCHEDULES
has the signature (progress, warmdown_fraction, warmup_fraction) -> multiplier of base_lr.
"""

from __future__ import annotations

from collections.abc import Callable


def lr_multiplier(progress: float, warmdown_fraction: float, warmup_fraction: float = 0.0) -> float:
    """The baseline shape: 1.0, then linear to 0 over the last `warmdown_fraction` of
    training; optionally a linear warmup from 0 over the first `warmup_fraction`."""
    progress = min(max(progress, 0.0), 1.0)
    multiplier = 1.0
    if warmup_fraction > 0 and progress < warmup_fraction:
        multiplier = progress / warmup_fraction
    remaining = 1.0 - progress
    if warmdown_fraction > 0 and remaining < warmdown_fraction:
        multiplier = min(multiplier, remaining / warmdown_fraction)
    return multiplier


ScheduleFn = Callable[[float, float, float], float]

SCHEDULES: dict[str, ScheduleFn] = {
    "warmdown": lr_multiplier,
}


def muon_momentum(
    step: int, warmup_steps: int = 500, start: float = 0.85, end: float = 0.95
) -> float:
    """Muon momentum, linear from `start` to `end` over the first `warmup_steps` steps.

    The baseline counts steps here: the warmup is short and fixed, so a wallclock cap
    never truncates it."""
    frac = min(step / warmup_steps, 1.0) if warmup_steps > 0 else 1.0
    return (1.0 - frac) * start + frac * end
