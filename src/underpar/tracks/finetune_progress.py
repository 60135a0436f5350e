"""Helpers of the fine-tuning loop: progress lines, what an interrupted or failed run leaves
behind, and AdamW state created up front."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from underpar.runs.rundir import RunDir
    from underpar.tracks.finetune import FinetuneConfig, Stage


def note_failure(run_dir: RunDir, error: Exception) -> None:
    """The error in train.log too (the CLI prints it), so the run directory says why it stopped."""
    if not run_dir.writer:
        return
    with open(run_dir.file("train.log"), "a") as log:
        log.write(f"stopped: {error}\n")


def pace(done: int, total: int, seconds: float) -> str:
    """'2.40 steps/s' (or '6.2 s/step'), percent done and the time to go at this pace."""
    rate = f"{done / seconds:.2f} steps/s" if seconds < done else f"{seconds / done:.1f} s/step"
    if done == total:
        return f"{rate} | done in {duration(seconds)}"
    return f"{rate} | {100 * done / total:.0f}%, ~{duration(seconds / done * (total - done))} to go"


def duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def interrupted(cfg: FinetuneConfig, run_dir: RunDir, stage: Stage) -> str:
    """What a Ctrl-C leaves behind: finetune keeps no checkpoints, so there is nothing to resume."""
    if stage.saved:
        first = cfg.eval.tasks[0] if cfg.eval.tasks else cfg.data.task
        return (f"interrupted while {stage.what}: the fine-tuned model is saved in {stage.saved} (no summary.json); "
                f"score it with `underpar eval task --model {stage.saved} --task {first}`")
    where = f"at step {stage.step} of training" if stage.what == "training" else f"while {stage.what}"
    return (f"interrupted {where}: nothing was saved (finetune keeps no checkpoints and cannot resume; "
            f"{run_dir.path} holds only its config and log); run the command again to start over")


def preallocate_adamw_state(optimizer: torch.optim.AdamW) -> None:
    """The state AdamW creates for a parameter on its first update (step, exp_avg, exp_avg_sq)."""
    for group in optimizer.param_groups:
        for p in group["params"]:
            state = optimizer.state[p]
            if not state:
                state["step"] = torch.tensor(0.0, dtype=torch.float32, device=p.device if group.get("fused") else "cpu")
                state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
