"""Training stages: structure or precision that changes during a run (depth recurrence switched
on at 35% of training, QAT switched on late) declared as switches `(at progress, name, set)`.

A compiled model keeps one graph per stage (a switch flips a Python attribute the graph is
specialised on). The trainer's untimed warmup visits every stage, so each graph is compiled
before the clock starts, and `Stages.enter(progress)` during the timed loop only selects among
graphs that exist; `compiled_graphs()` counts dynamo's graphs, so a run can prove that nothing
was compiled inside its timed region.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch._dynamo
from torch._dynamo.utils import counters

GRAPHS_PER_STAGE = 8  # dynamo's default recompile limit, for each stage


@dataclass(frozen=True)
class Switch:
    at: float  # the training progress in (0, 1] from which it is on
    name: str
    set: Callable[[bool], None]  # turns the change on (True) or off (False)


class Stages:
    """The stages a run's switches make: stage k begins at the k-th distinct `at` (stage 0 at
    progress 0, every switch off)."""

    def __init__(self, switches: list[Switch]):
        self.switches = sorted(switches, key=lambda s: s.at)
        self.starts = sorted({0.0} | {s.at for s in self.switches})
        self._on: tuple[bool, ...] | None = None

    def __len__(self) -> int:
        return len(self.starts)

    def enter(self, progress: float) -> list[str]:
        """Set every switch for `progress`; the changes made, as "name on" / "name off"."""
        on = tuple(s.at <= progress for s in self.switches)
        if on == self._on:
            return []
        before = self._on or (False,) * len(on)  # the first call reports what it turns on
        changes = []
        for switch, value, was in zip(self.switches, on, before):
            switch.set(value)
            if value != was:
                changes.append(f"{switch.name} {'on' if value else 'off'}")
        self._on = on
        return changes

    def allow_their_graphs(self) -> None:
        """Let every compiled function keep dynamo's default number of graphs in each stage: a
        stage that changes shapes (progressive growing: every Muon stack grows) gives each
        compiled function a graph per shape and stage, which dynamo counts as recompiles and fails
        a fullgraph compile past its limit. Only raises the limit."""
        limit = GRAPHS_PER_STAGE * len(self)
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, limit)

    def describe(self) -> str:
        if not self.switches:
            return "1 training stage"
        parts = [f"{s.name} at {s.at:.0%}" for s in self.switches]
        return f"{len(self)} training stages: " + ", ".join(parts)


def compiled_graphs() -> int:
    """Graphs dynamo has compiled in this process so far (each stage's forward is one)."""
    return counters["stats"]["unique_graphs"]
