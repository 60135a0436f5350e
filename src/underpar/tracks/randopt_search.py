"""RandOpt's population and its scoring: the seeded draw, selection by train reward, the
population.jsonl a stopped search resumes from, the rank-sharded map with a progress bar that
every phase runs through, prompt sets tokenized once, and one fixed-shape greedy answerer that
every candidate and diagnostic shares."""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import random
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from underpar import dist
from underpar.data.sft import prompt_ids
from underpar.data.tasks import Example, Task, get_task
from underpar.config import bounded, choice
from underpar.errors import ConfigError, DataError
from underpar.eval.generate import ENGINES, DecodeConfig, GenerationStats, generate
from underpar.eval.stats import mean
from underpar.kernels.perturb_space import PerturbSpace
from underpar.tracks.randopt_population_forward import ATTENTION
from underpar.ui import progress

POPULATION_FILE = "population.jsonl"
MERGE_OPS = {"average": 0.5, "sum": 1.0}  # a merge of a and b is W0 + h * (sigma_a R_a + sigma_b R_b)

# ---------------------------------------------------------------- population and selection


def draw_population(size: int, sigmas: Sequence[float], seed: int) -> list[tuple[int, float]]:
    """`size` distinct seeds from [0, 2**31), drawn without replacement by random.Random(seed),
    then one sigma per seed drawn from the grid by the same generator: [(seed, sigma), ...]."""
    rng = random.Random(seed)
    seeds = rng.sample(range(2**31), size)
    return [(s, rng.choice(list(sigmas))) for s in seeds]


def top_k(ratio: float, population: int) -> int:
    """K = max(1, int(ratio * N)); the 1e-9 keeps products like 0.29 * 100 = 28.999... at 29."""
    return max(1, int(ratio * population + 1e-9))


def rank(rows: Sequence[dict]) -> list[int]:
    """Candidate indices by train reward, best first; ties keep draw order (a stable sort)."""
    return sorted(range(len(rows)), key=lambda i: -rows[i]["reward"])


def k1_indices(k1_seeds: int, ranked: Sequence[int], kmax: int, seed: int) -> list[int]:
    """Candidates for the K=1 diagnostic, in rank order: all (-1), none (0), or the top max-K
    (already answered for the ensembles) plus a seeded uniform sample of the rest, n in all."""
    if k1_seeds < 0 or k1_seeds >= len(ranked):
        return list(ranked)
    top = list(ranked[:min(kmax, k1_seeds)])
    sample = set(random.Random(f"randopt-k1-{seed}").sample(ranked[len(top):], k1_seeds - len(top)))
    return top + [i for i in ranked[len(top):] if i in sample]


def merge_pairs(members: Sequence[int], count: int, seed: int) -> list[tuple[int, int]]:
    """`count` distinct pairs of ensemble members (all pairs if there are fewer), seeded."""
    pairs = list(itertools.combinations(members, 2))
    return random.Random(f"randopt-merges-{seed}").sample(pairs, min(count, len(pairs)))


def read_population(path: Path, population: Sequence[tuple[int, float]], writer: bool) -> dict[int, dict]:
    """Rows of a stopped search, by candidate index. A torn last line (killed mid-write) is
    dropped (and the file rewritten without it by the writer); a row that is not this
    config's candidate is a ConfigError."""
    if not path.is_file():
        return {}
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    rows: dict[int, dict] = {}
    for n, line in enumerate(lines):
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            if n == len(lines) - 1:
                if writer:
                    path.write_text("".join(line + "\n" for line in lines[:-1]))
                break
            raise DataError(f"{path} line {n + 1} is not JSON; delete the line to rescore it") from None
        i = row.get("index", -1)
        if not 0 <= i < len(population) or (row["seed"], row["sigma"]) != population[i]:
            raise ConfigError(f"{path} line {n + 1} (candidate {i}, seed {row.get('seed')}) is not a "
                              "candidate of this config's population; resume with the run's own config")
        rows[i] = row
    return rows


def map_with_progress(env: dist.Env, label: str, unit: str, items: Sequence[Any], fn: Callable[[Any], Any],
                      done: int = 0, on_round: Callable[[list[tuple[int, Any]]], str | None] | None = None,
                      chunk: int = 1) -> list[Any]:
    """`dist.sharded_map(env, items, fn)` behind a progress bar on rank 0: count, rate in `unit`/s,
    elapsed, ETA. `done` = items finished before (a resumed search): they count towards the
    total, not the rate. `on_round(pairs)` sees each round and may return text for the bar.
    `chunk` > 1: `fn` takes a list of up to `chunk` items and returns one result per item (a
    population decoded together); the rank sharding, rounds and the bar go by chunks, the
    results and `on_round`'s (index, result) pairs by items."""
    if not items:
        return []
    start, count = time.perf_counter(), 0
    groups = [list(items[k:k + chunk]) for k in range(0, len(items), chunk)] if chunk > 1 else items
    with progress() as bar:
        task = bar.add_task(label, total=done + len(items), completed=done, info="")

        def arrived(pairs: list[tuple[int, Any]]) -> None:
            nonlocal count
            if chunk > 1:
                pairs = [(g * chunk + k, r) for g, results in pairs for k, r in enumerate(results)]
            count += len(pairs)
            extra = on_round(pairs) if on_round is not None else None
            rate = count / max(time.perf_counter() - start, 1e-9)
            bar.update(task, advance=len(pairs), info=f"{rate:.3g} {unit}/s" + (f", {extra}" if extra else ""))

        results = dist.sharded_map(env, groups, fn, on_round=arrived)
    return [r for group in results for r in group] if chunk > 1 else results


# ---------------------------------------------------------------- the candidates' weights


@dataclasses.dataclass
class Candidates:
    """The drawn population on one model: candidate i is W0 + sigma_i * R(seed_i), rebuilt in
    place from the perturbation space's resident base copy."""

    space: PerturbSpace
    drawn: list[tuple[int, float]]  # (seed, sigma) by candidate index
    backend: str

    def apply(self, i: int | None) -> None:
        """Candidate i's weights; None = the base model."""
        if i is None:
            self.space.restore()
        else:
            self.space.apply(*self.drawn[i], self.backend)

    def apply_merge(self, a: int, b: int, op: str) -> None:
        """W0 + h * (sigma_a R_a + sigma_b R_b), h by `MERGE_OPS[op]`."""
        (seed_a, sigma_a), (seed_b, sigma_b) = self.drawn[a], self.drawn[b]
        h = MERGE_OPS[op]
        self.space.apply_combination([(seed_a, h * sigma_a), (seed_b, h * sigma_b)], self.backend)


# ---------------------------------------------------------------- prompts, answers, scores


@dataclasses.dataclass
class RODecodeConfig:
    """Greedy decoding of every prompt set (see underpar.eval.generate)."""

    max_new_tokens: int = bounded(128, 1)
    batch_size: int = bounded(32, 1)  # rows of the one decoder; sets are padded to whole batches
    engine: str = choice("static", ENGINES)
    compile: bool = True  # static engine on CUDA: the decode step becomes a CUDA graph
    deterministic: bool = False  # compiled static step: Inductor's deterministic mode (see DecodeConfig)
    # candidates decoded together in one forward (stacked weights, Llama-family models; on CUDA
    # a CUDA graph per step when compile is on; reproducible: no kernel is chosen by timing);
    # 1 = one candidate at a time through `engine`
    population: int = bounded(1, 1)
    # population > 1 (randopt_population.py): the attention kernels of the decode steps and of
    # the prefill, the decode steps' layers compiled by Inductor (CUDA, with compile), and
    # finished-row compaction
    population_attention: str = choice("fused_decode", tuple(ATTENTION))
    population_prefill_attention: str = choice("sdpa_efficient", tuple(ATTENTION))
    population_fuse: bool = True
    population_compact: bool = False

    def engine_config(self) -> DecodeConfig:
        return DecodeConfig(**{k: v for k, v in dataclasses.asdict(self).items() if not k.startswith("population")})



@dataclasses.dataclass
class PromptSet:
    """One task's examples and their chat-templated prompt token ids (tokenized once)."""

    name: str
    task: Task
    examples: list[Example]
    ids: list[list[int]]


def load_examples(name: str, split: str, limit: int, seed: int = 0, path: str | None = None) -> list[Example]:
    """The first `limit` examples of task `name`'s split (generated ones drawn by `seed`, or
    read from the local file `path`); needs no model, so bad task data is found before one loads."""
    examples = get_task(name).load(split, limit=limit, seed=seed, path=path)
    if not examples:
        raise DataError(f"task {name!r} gave no {split} examples; check task_paths or the data")
    return examples


def tokenize_prompts(tokenizer: Any, name: str, examples: list[Example]) -> PromptSet:
    """Task `name`'s examples as chat prompts, tokenized once."""
    task = get_task(name)
    return PromptSet(name, task, examples, [prompt_ids(tokenizer, task.prompt_messages(e)) for e in examples])


@dataclasses.dataclass
class Answerer:
    """Greedy completions of prompt sets. A set smaller than `rows` is padded with copies of
    its first prompt (dropped afterwards), so every call has the same batch shape and the one
    static decoder built by `warm_up` serves all of them: no rebuild, no recompilation."""

    model: Any
    tokenizer: Any
    decode: DecodeConfig
    rows: int

    def warm_up(self, sets: Sequence[PromptSet]) -> None:
        """Build (and compile) the decoder for the longest prompt of all sets; later calls fit."""
        longest = max((ids for s in sets for ids in s.ids), key=len)
        generate(self.model, self.tokenizer, [longest] * self.rows, self.decode)

    def texts(self, prompts: PromptSet, stats: GenerationStats | None = None) -> list[str]:
        ids = prompts.ids + [prompts.ids[0]] * (self.rows - len(prompts.ids))
        return [c.text for c in generate(self.model, self.tokenizer, ids, self.decode, stats)][:len(prompts.ids)]

    def answers(self, prompts: PromptSet) -> list[str | None]:
        """The extracted answer to each question (None where there is none)."""
        return [prompts.task.extract(text) for text in self.texts(prompts)]


def correct(prompts: PromptSet, answers: Sequence[str | None]) -> list[bool]:
    return [prompts.task.is_correct(a, e.answer) for a, e in zip(answers, prompts.examples, strict=True)]


def score_candidate(answerer: Answerer, space: PerturbSpace, prompts: PromptSet, seed: int, sigma: float,
                    backend: str = "auto") -> dict[str, Any]:
    """Train reward of W0 + sigma * R(seed): the mean task reward of its greedy completions,
    with the decoded tokens (padded rows included), seconds and a digest of the completions."""
    space.apply(seed, sigma, backend)
    stats = GenerationStats()
    texts = answerer.texts(prompts, stats)
    return {**score_texts(prompts, texts), "tokens": stats.generated_tokens, "seconds": round(stats.seconds, 4)}


def score_texts(prompts: PromptSet, texts: Sequence[str]) -> dict[str, Any]:
    """The mean task reward of one candidate's completions and a digest of them (equal digests:
    the same completions, whichever engine decoded them)."""
    rewards = [prompts.task.reward(text, e) for text, e in zip(texts, prompts.examples, strict=True)]
    return {"reward": mean(rewards), "digest": hashlib.sha1("\x00".join(texts).encode("utf-8")).hexdigest()[:16]}


def say_how_to_resume(run_dir: Any, pop_file: Path, population: int, done: str = "candidates are scored") -> None:
    """On Ctrl-C: what the run directory keeps, and the command that continues it."""
    scored = 0
    if pop_file.is_file():
        for line in pop_file.read_text().splitlines():
            try:
                scored += isinstance(json.loads(line), dict)
            except json.JSONDecodeError:  # a line torn by the interrupt: rescored on resume
                pass
    run_dir.log(f"interrupted: {scored} of {population} {done} and kept in {pop_file}; "
                f"continue with `underpar randopt --resume {run_dir.path}` (only the missing ones are scored)")
