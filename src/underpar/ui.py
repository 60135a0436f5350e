"""Console output: rich progress bars for long work, shown on rank 0 only."""

from __future__ import annotations

import os

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

console = Console(stderr=True)


def progress(disable: bool = False) -> Progress:
    """A progress display; use `with progress() as p: task = p.add_task(...)`. Shown on rank 0
    only, unless `disable`."""
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[info]}"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=console,
        disable=disable or int(os.environ.get("RANK", 0)) != 0,
    )
