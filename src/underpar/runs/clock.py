"""The training budget's clock: training time under a wallclock cap and/or a step budget,
paused around evaluation and checkpoints (which are not training)."""

from __future__ import annotations

import time

import torch


class Clock:
    """`progress(step)` is the fraction of the budget used: elapsed / max_seconds or
    step / max_steps, whichever is further (a 0 leaves that limit out)."""

    def __init__(self, max_seconds: float, max_steps: int, elapsed: float = 0.0, device: torch.device | None = None):
        self.max_seconds, self.max_steps, self.elapsed, self.device = max_seconds, max_steps, elapsed, device
        self.started: float | None = None

    def _sync(self) -> None:
        if self.device is not None and self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def start(self) -> None:
        self._sync()
        self.started = time.perf_counter()

    def pause(self) -> None:
        self._sync()
        self.elapsed += time.perf_counter() - self.started
        self.started = None

    def now(self) -> float:
        """Training seconds so far."""
        return self.elapsed + (time.perf_counter() - self.started if self.started is not None else 0.0)

    def progress(self, step: int) -> float:
        by_time = self.now() / self.max_seconds if self.max_seconds else 0.0
        by_steps = step / self.max_steps if self.max_steps else 0.0
        return min(1.0, max(by_time, by_steps))
