"""Checkpoints for resuming a run: model, optimizers, loader position, RNG states, elapsed time.

Each rank writes its own file (Muon keeps momentum only for the matrices its rank owns), via a
temporary name and a rename, so a kill mid-write leaves the previous checkpoint intact.
"""

from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from underpar.errors import UnderparError


def checkpoint_path(run_dir: Path, rank: int) -> Path:
    return Path(run_dir) / f"checkpoint-rank{rank}.pt"


def rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save(path: Path, model: torch.nn.Module, optimizers: list, loader_state: dict, **extra: Any) -> None:
    payload = {
        "model": model.state_dict(),
        "optimizers": [opt.state_dict() for opt in optimizers],
        "loader": loader_state,
        "rng": rng_state(),
        **extra,
    }
    tmp = path.with_name(path.name + ".tmp")
    torch.save(payload, tmp)
    os.replace(tmp, path)


def load(path: Path, model: torch.nn.Module, optimizers: list, world_size: int) -> dict[str, Any]:
    """Restore model and optimizer state in place; returns the rest (step, elapsed, loader, rng)."""
    if not path.is_file():
        raise UnderparError(
            f"no checkpoint {path.name} in {path.parent}; resume needs a run that saved one "
            f"(train.checkpoint_every_steps > 0) and the same number of processes ({world_size})"
        )
    payload = torch.load(path, map_location="cpu", weights_only=False)
    if payload.get("world_size") != world_size:
        raise UnderparError(
            f"{path} was written by {payload.get('world_size')} processes; resume it with as many (got {world_size})"
        )
    model.load_state_dict(payload["model"])
    for opt, state in zip(optimizers, payload["optimizers"], strict=True):
        opt.load_state_dict(state)
    return payload
