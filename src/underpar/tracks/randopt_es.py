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
folder. In the track: `underpar randopt --set method=es` (`run_track`, called by randopt.py after
the base accuracy): the same train reward and scorers as the search (decode.population chunks),
then the final weights answer the test sets (paired with the base) and are saved in the run
directory's model/ folder; the model holds the starting weights again afterwards.
"""

from __future__ import annotations

import dataclasses
import json
import math
import random
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from underpar import dist
from underpar.config import bounded, validate
from underpar.errors import ConfigError, DataError
from underpar.eval.stats import accuracy_ci
from underpar.kernels.perturb_space import PerturbSpace
from underpar.runs.rundir import Summary
from underpar.tracks.randopt_diagnostics import paired
from underpar.tracks.randopt_search import correct, map_with_progress, score_candidate

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
           say: Callable[[str], None] = print, writer: bool = True) -> list[dict[str, Any]]:
    """`cfg.iterations` ES steps on `space`'s base, resuming from `log` (written by the `writer`
    only: one process of several); returns every iteration's row. `score(population)` gets
    (seed, +-sigma) candidates around the current base."""
    validate(cfg)
    history = read_log(log, cfg)
    if history and writer:
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
        if writer:
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


# ---------------------------------------------------------------- the track's ES method


@dataclasses.dataclass(kw_only=True)
class ESSummary(Summary):
    model: str
    task: str
    es: dict[str, Any]  # the ESConfig
    evaluations: int  # candidate evaluations (2 x pairs x iterations), resumed ones included
    base: dict[str, Any]  # {"train": accuracy, "test": {task: accuracy}}
    iterations: list[dict[str, float]]  # per iteration: mean and best train reward
    test: dict[str, dict[str, Any]]  # per test set: accuracy, delta, gained, lost, mcnemar_p
    model_dir: str
    seconds: float  # the ES iterations of this process
    timing: dict[str, float]
    transformers: str


def run_track(cfg: Any, env: dist.Env, run_dir: Any, model: Any, tokenizer: Any, space: PerturbSpace, answerer: Any,
              batched: Any, train: Any, tests: list, base: dict, base_answers: list, timing: dict) -> ESSummary:
    """`cfg.es` iterations from the base on `train`'s reward (chunks of decode.population when
    `batched`, else one candidate at a time), then the test sets; rank-sharded like the search."""
    original = space.base_flat.clone()
    size = cfg.decode.population

    def score(population: list[tuple[int, float]]) -> list[float]:
        if batched is None:
            rows = map_with_progress(env, "es candidates", "seeds", population,
                                     lambda c: score_candidate(answerer, space, train, *c, cfg.backend))
        else:
            rows = map_with_progress(env, "es candidates", "seeds", population, chunk=size,
                                     fn=lambda chunk: batched.score(chunk, train))
        return [r["reward"] for r in rows]

    start = time.perf_counter()
    try:
        history = run_es(space, score, cfg.es, run_dir.file(ES_FILE), cfg.backend, run_dir.log, run_dir.writer)
        seconds = time.perf_counter() - start
        final = [answerer.answers(s) for s in tests]  # the live weights are the final base
        model_dir = run_dir.path / "model"
        if run_dir.writer:
            save_model(model, tokenizer, model_dir)
    finally:
        with torch.no_grad():
            space.base_flat.copy_(original)
            space.master = None
        space.restore()
    test = {}
    for s, before, after in zip(tests, base_answers[1:], final):
        acc = accuracy_ci(correct(s, after))
        test[s.name] = {"accuracy": acc, "base": base["test"][s.name], "delta": acc["mean"] - base["test"][s.name]["mean"],
                        **paired(correct(s, before), correct(s, after))}
        run_dir.log(f"es {s.name}: {acc['mean']:.3f} [{acc['lo']:.3f}, {acc['hi']:.3f}] vs base "
                    f"{base['test'][s.name]['mean']:.3f} (McNemar p {test[s.name]['mcnemar_p']:.3f})")
    import transformers

    timing["es"] = round(time.perf_counter() - start, 3)
    summary = ESSummary(name=cfg.name, run_dir=str(run_dir.path), model=cfg.model, task=cfg.task,
                        es=dataclasses.asdict(cfg.es), evaluations=2 * cfg.es.pairs * len(history), base=base,
                        iterations=[{"mean_reward": h["mean_reward"], "best_reward": max(h["plus"] + h["minus"])}
                                    for h in history],
                        test=test, model_dir=str(model_dir), seconds=round(seconds, 3), timing=timing,
                        transformers=transformers.__version__)
    run_dir.save_summary(summary)
    run_dir.log(f"es: {summary.evaluations} evaluations, train mean reward "
                f"{history[0]['mean_reward']:.3f} -> {history[-1]['mean_reward']:.3f}; model saved in {model_dir}")
    return summary
