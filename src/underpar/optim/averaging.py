"""Weight averaging over a training run: EMA, SWA and LAWA, registered in AVERAGING, each a
parameter dataclass (`optim.averaging`) that builds an Averager over the model's parameters.

The trainer calls `update(step, progress)` after each optimizer step: eager `torch._foreach_*`
ops on fp32 copies, outside the compiled forward, so nothing recompiles. After the timed loop
`apply()` writes the averaged weights into the parameters: they are the ones validated,
exported and scored. `state_dict()` / `load_state_dict()` travel in checkpoints, so a resumed
run averages exactly as an uninterrupted one.
"""

from __future__ import annotations

import collections
import dataclasses
from collections.abc import Sequence
from typing import Any, Protocol

import torch
from torch import Tensor

from underpar.config import bounded
from underpar.errors import UnderparError
from underpar.optim.schedule import Schedule, decay_start
from underpar.registry import Registry


class Averager:
    """No averaging: the weights after the last step are the final ones."""

    def update(self, step: int, progress: float) -> None:
        """After optimizer step number `step` (1-based), taken at `progress` in [0, 1]."""

    def apply(self) -> str:
        """Write the averaged weights into the parameters; a line for the log ("" = none)."""
        return ""

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any] | None) -> None:
        """Restore `state_dict()`; None (a checkpoint written without averaging) is refused
        by averagers that keep state."""


class AveragingConfig(Protocol):
    def build(self, params: Sequence[Tensor], schedule: Schedule) -> Averager: ...


AVERAGING: Registry[type[AveragingConfig]] = Registry("averaging")


class _Copies:
    """fp32 copies of parameters, updated with one foreach op per parameter dtype (bf16
    parameters are upcast on the fly)."""

    def __init__(self, params: Sequence[Tensor]):
        self.params = list(params)
        with torch.no_grad():
            self.values = [p.detach().float().clone() for p in self.params]
        self._by_dtype: dict[torch.dtype, tuple[list[Tensor], list[Tensor]]] = {}
        for value, p in zip(self.values, self.params):
            values, params_ = self._by_dtype.setdefault(p.dtype, ([], []))
            values.append(value)
            params_.append(p)

    @torch.no_grad()
    def lerp_(self, weight: float) -> None:
        """values += weight * (params - values)."""
        for dtype, (values, params) in self._by_dtype.items():
            torch._foreach_lerp_(values, params if dtype == torch.float32 else [p.float() for p in params], weight)

    @torch.no_grad()
    def copy_params(self) -> None:
        torch._foreach_copy_(self.values, self.params)

    @torch.no_grad()
    def write_params(self, values: Sequence[Tensor] | None = None) -> None:
        torch._foreach_copy_(self.params, list(self.values if values is None else values))

    @torch.no_grad()
    def load(self, values: Sequence[Tensor]) -> None:
        if len(values) != len(self.values):
            raise UnderparError(f"the checkpoint averages {len(values)} tensors; this model has {len(self.values)}")
        for mine, saved in zip(self.values, values):
            mine.copy_(saved)


def _needs(state: dict[str, Any] | None, what: str) -> dict[str, Any]:
    if state is None:
        raise UnderparError(f"this checkpoint holds no {what} state; resume it with the optim.averaging it was started with")
    return state


@AVERAGING.register("none")
@dataclasses.dataclass
class NoAveraging:
    """The last weights are exported (the baseline)."""

    def build(self, params: Sequence[Tensor], schedule: Schedule) -> Averager:
        return Averager()


@AVERAGING.register("ema")
@dataclasses.dataclass
class EMA:
    """Exponential moving average after every step, from the first step of the timed loop:
    avg <- decay * avg + (1 - decay) * weights (PR #1584 and the top records: decay 0.9965,
    with torch._foreach_*). Kept in fp32 whatever the parameters' dtype."""

    decay: float = bounded(0.9965, 0.0, 1.0)

    def build(self, params: Sequence[Tensor], schedule: Schedule) -> Averager:
        return _EMAverager(params, self.decay)


class _EMAverager(Averager):
    def __init__(self, params: Sequence[Tensor], decay: float):
        self.average = _Copies(params)  # starts at the initial weights
        self.decay, self.updates = decay, 0

    def update(self, step: int, progress: float) -> None:
        self.average.lerp_(1.0 - self.decay)
        self.updates += 1

    def apply(self) -> str:
        self.average.write_params()
        return f"averaging: the EMA (decay {self.decay}) over {self.updates} steps replaces the last weights"

    def state_dict(self) -> dict[str, Any]:
        return {"average": self.average.values, "updates": self.updates}

    def load_state_dict(self, state: dict[str, Any] | None) -> None:
        state = _needs(state, "EMA")
        self.average.load(state["average"])
        self.updates = state["updates"]


@AVERAGING.register("swa")
@dataclasses.dataclass
class SWA:
    """Stochastic weight averaging: the uniform mean of the weights after every
    `every_steps`-th step from `start_fraction` of training on (a running mean in fp32)."""

    start_fraction: float = bounded(0.5, 0.0, 1.0)
    every_steps: int = bounded(1, 1)

    def build(self, params: Sequence[Tensor], schedule: Schedule) -> Averager:
        return _MeanAverager(params, "SWA", self.start_fraction, self.every_steps, window=0)


@AVERAGING.register("lawa")
@dataclasses.dataclass
class LAWA:
    """PR #38's LAWA: a snapshot of the weights every `every_steps` steps during the
    warmdown, averaged uniformly after training. The warmdown starts where the LR schedule
    leaves its peak for good (0.913 of the default warmdown, 0.382 of tidal), or at
    `start_fraction` when that is > 0. `window` > 0 averages only the latest `window`
    snapshots (the original LAWA's last-k average; they are kept in memory), 0 all of them
    (a running mean). With fewer than 2 snapshots the trained weights stay, as in PR #38."""

    every_steps: int = bounded(50, 1)
    start_fraction: float = bounded(0.0, 0.0, 1.0)  # 0 = where the schedule's decay begins
    window: int = bounded(0, 0)

    def build(self, params: Sequence[Tensor], schedule: Schedule) -> Averager:
        start = self.start_fraction if self.start_fraction > 0 else decay_start(schedule)
        return _MeanAverager(params, "LAWA", start, self.every_steps, self.window)


class _MeanAverager(Averager):
    """The uniform mean of snapshots taken after every `every_steps`-th step at progress >=
    `start`: a running mean, or the latest `window` snapshots when window > 0."""

    def __init__(self, params: Sequence[Tensor], label: str, start: float, every_steps: int, window: int):
        self.params = list(params)
        self.label, self.start, self.every_steps, self.window = label, start, every_steps, window
        self.mean: _Copies | None = None  # allocated at the first snapshot
        self.snapshots: collections.deque[list[Tensor]] = collections.deque()
        self.steps: list[int] = []  # the steps snapshotted (those averaged, when windowed)

    def update(self, step: int, progress: float) -> None:
        if step % self.every_steps or progress < self.start:
            return
        if self.window:
            if len(self.snapshots) == self.window:  # reuse the oldest snapshot's memory
                snapshot = self.snapshots.popleft()
                self.steps.pop(0)
                with torch.no_grad():
                    torch._foreach_copy_(snapshot, self.params)
            else:
                snapshot = _Copies(self.params).values
            self.snapshots.append(snapshot)
        elif self.mean is None:
            self.mean = _Copies(self.params)
        else:
            self.mean.lerp_(1.0 / (len(self.steps) + 1))  # running mean: m += (w - m) / n
        self.steps.append(step)

    def apply(self) -> str:
        n = len(self.steps)
        what = f"averaging: {self.label} took {n} snapshot(s) from progress {self.start:.3f}"
        if n < 2:
            return f"{what}; fewer than 2, so the last weights stay"
        if self.window:
            with torch.no_grad():
                mean = [t.clone() for t in self.snapshots[0]]
                for snapshot in list(self.snapshots)[1:]:
                    torch._foreach_add_(mean, snapshot)
                torch._foreach_div_(mean, n)
                torch._foreach_copy_(self.params, mean)
        else:
            assert self.mean is not None
            self.mean.write_params()
        return f"{what} (steps {self.steps[0]}..{self.steps[-1]}); their mean replaces the last weights"

    def state_dict(self) -> dict[str, Any]:
        return {"steps": list(self.steps), "mean": None if self.mean is None else self.mean.values,
                "snapshots": list(self.snapshots)}

    def load_state_dict(self, state: dict[str, Any] | None) -> None:
        state = _needs(state, self.label)
        self.steps = list(state["steps"])
        self.mean = None
        if state["mean"] is not None:
            self.mean = _Copies(self.params)
            self.mean.load(state["mean"])
        device = self.params[0].device if self.params else None
        self.snapshots = collections.deque(
            [[t.to(device=device, dtype=torch.float32, copy=True) for t in s] for s in state["snapshots"]])
