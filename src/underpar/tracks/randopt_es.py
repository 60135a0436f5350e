"""Evolution strategies on RandOpt's seeded perturbations (issue 18): the iterative sibling of
RandOpt's one-shot select-and-vote, from the same sign streams R(seed) and the same scorers.

Each iteration draws `pairs` seeds, scores the antithetic candidates W + sigma R(seed) and
W - sigma R(seed), normalizes the 2 x pairs rewards to z-scores and moves the base:

    W <- W + lr / (N sigma) * sum_i z_i eps_i,   N = 2 pairs,  eps = +R or -R,

i.e. one term per seed with coefficient lr / (N sigma) * (z_plus - z_minus), applied by
`PerturbSpace.update_base` (the fused kernel over the flat layout, an fp32 master copy, no noise
materialized). Checkpoint = es.jsonl, one line per iteration with its seeds, rewards and update
terms: the weights are a pure function of the starting base and those terms, so a stopped run
resumes by replaying the logged updates (no rescoring) and continues with the next iteration,
bit for bit the weights an uninterrupted run reaches. `save_model` writes a plain Hugging Face
folder. Not yet wired into `underpar randopt` (a `--method es` switch): callers pass a scorer.
"""

from __future__ import annotations

import dataclasses
import json
import math
import random
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from underpar.config import bounded, validate
from underpar.errors import ConfigError, DataError
from underpar.kernels.perturb_space import PerturbSpace

ES_FILE = "es.jsonl"

Scorer = Callable[[list[tuple[int, float]]], Sequence[float]]  # (seed, signed sigma) -> reward each


@dataclasses.dataclass
class ESConfig:
    """N = 2 x pairs evaluations per iteration. ES at scale (sigma 1e-3, N = 30) steps by
    alpha / N * sum z_i eps_i with alpha = 5e-4; this lr multiplies the 1 / (N sigma) estimator
    instead, so the same step is lr = alpha * sigma = 5e-7 (the default)."""

    iterations: int = bounded(4, 1)
    pairs: int = bounded(8, 1)
    sigma: float = 1e-3
    lr: float = 5e-7
    seed: int = bounded(0, 0)  # draws every iteration's seeds

    def check(self) -> None:
        for name in ("sigma", "lr"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value > 0):
                raise ConfigError(f"es.{name} = {value} must be a positive number")


def iteration_seeds(seed: int, iteration: int, pairs: int) -> list[int]:
    """Iteration `iteration`'s `pairs` distinct seeds from [0, 2**31), drawn by its own generator."""
    return random.Random(f"es-{seed}-{iteration}").sample(range(2**31), pairs)


def update_terms(seeds: Sequence[int], plus: Sequence[float], minus: Sequence[float], sigma: float,
                 lr: float) -> list[tuple[int, float]]:
    """(seed, coefficient) terms of one ES step: rewards z-scored over all 2N evaluations, then
    lr / (2N sigma) * (z_plus - z_minus) per seed. Equal rewards carry no signal: no terms."""
    rewards = [*plus, *minus]
    mean = sum(rewards) / len(rewards)
    std = math.sqrt(sum((r - mean) ** 2 for r in rewards) / len(rewards))
    if std == 0:
        return []
    scale = lr / (len(rewards) * sigma)
    return [(s, scale * ((p - mean) / std - (m - mean) / std)) for s, p, m in zip(seeds, plus, minus, strict=True)]


def read_log(path: Path, cfg: ESConfig) -> list[dict[str, Any]]:
    """The iterations of a stopped run (a torn last line is dropped); a line that another
    config would not have written is a ConfigError."""
    if not path.is_file():
        return []
    rows = []
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    for n, line in enumerate(lines):
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            if n == len(lines) - 1:
                break
            raise DataError(f"{path} line {n + 1} is not JSON; delete it and the lines after it to redo them") from None
        if row.get("iteration") != n or row.get("seeds") != iteration_seeds(cfg.seed, n, cfg.pairs) \
                or row.get("sigma") != cfg.sigma or row.get("lr") != cfg.lr:
            raise ConfigError(f"{path} line {n + 1} was written by another ES config (seed, pairs, sigma or lr); "
                              "resume with the run's own config")
        rows.append(row)
    return rows


def run_es(space: PerturbSpace, score: Scorer, cfg: ESConfig, log: Path, backend: str = "auto",
           say: Callable[[str], None] = print) -> list[dict[str, Any]]:
    """`cfg.iterations` ES steps on `space`'s base, resuming from `log`; returns every iteration's
    row. `score(population)` gets (seed, +-sigma) candidates around the current base."""
    validate(cfg)
    history = read_log(log, cfg)
    if history:
        log.write_text("".join(json.dumps(row) + "\n" for row in history))  # without a torn line
        for row in history:
            space.update_base([tuple(t) for t in row["terms"]], backend)
        say(f"es: resumed after {len(history)} of {cfg.iterations} iterations (updates replayed)")
    for it in range(len(history), cfg.iterations):
        seeds = iteration_seeds(cfg.seed, it, cfg.pairs)
        rewards = list(score([(s, cfg.sigma) for s in seeds] + [(s, -cfg.sigma) for s in seeds]))
        plus, minus = rewards[:cfg.pairs], rewards[cfg.pairs:]
        terms = update_terms(seeds, plus, minus, cfg.sigma, cfg.lr)
        space.update_base(terms, backend)
        row = {"iteration": it, "seeds": seeds, "sigma": cfg.sigma, "lr": cfg.lr, "plus": plus, "minus": minus,
               "mean_reward": sum(rewards) / len(rewards), "terms": terms}
        with open(log, "a") as f:
            f.write(json.dumps(row) + "\n")
        history.append(row)
        say(f"es iteration {it + 1}/{cfg.iterations}: mean reward {row['mean_reward']:.4f}, "
            f"best {max(rewards):.4f}, {len(terms)} update terms")
    return history


def save_model(model: Any, tokenizer: Any, folder: str | Path) -> Path:
    """The current weights as a plain Hugging Face folder (`from_pretrained` loads it). The flat
    layout makes every parameter a view of one buffer, which safetensors refuses to write as
    shared storage, so each tensor is written from its own copy."""
    folder = Path(folder)
    state = {name: t.detach().clone() for name, t in model.state_dict().items()}
    model.save_pretrained(folder, state_dict=state)
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)
    return folder
