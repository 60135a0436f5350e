"""The RandOpt track (gradient-free post-training): score N seeded random perturbations
W0 + sigma * R(seed) of a pretrained model by greedy reward on a train slice, keep the top K,
and answer held-out questions by majority vote of the K perturbed models.

load -> base accuracy -> population search (one JSON line per candidate as it arrives, so a
stopped search resumes; candidate i on rank i % world_size under torchrun) -> top-K by train
reward -> majority-vote ensembles per test set and K -> diagnostics (K=1 train-vs-test
transfer, pairwise merges, held-out bits per byte) -> summary.json + plot. The model holds the
base weights again when `run` returns, also when it fails.

Speed: weights are rebuilt in place from a resident base copy (one fused pass per tensor, no
restore pass), and every prompt set is generated as whole batches of one fixed row count, so
one static decoder, built and compiled once in an untimed warm-up, serves every call.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import math
import random
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch.distributed as torch_dist

from underpar import config as cfglib
from underpar import dist
from underpar.config import bounded, choice, items, nested
from underpar.data import corpora
from underpar.data.sft import prompt_ids
from underpar.data.tasks import TASKS, Example, Task, get_task
from underpar.errors import ConfigError, DataError
from underpar.eval import ensemble
from underpar.data.answers import vote_key
from underpar.eval.ensemble import mean
from underpar.eval.generate import ENGINES, DecodeConfig, GenerationStats, generate
from underpar.eval.stats import accuracy_ci
from underpar.kernels.perturb import BACKENDS, PerturbSpace
from underpar.model import hf
from underpar.runs.rundir import RunDir, environment
from underpar.ui import progress

POPULATION_FILE = "population.jsonl"
# Fields that define the population and its train rewards: a resumed run must keep them.
SEARCH_FIELDS = ("model", "dtype", "task", "train_examples", "task_paths", "data_seed", "population",
                 "sigmas", "seed", "include", "exclude", "backend", "decode")


@dataclasses.dataclass
class RODecodeConfig:
    """Greedy decoding of every prompt set (see underpar.eval.generate)."""

    max_new_tokens: int = bounded(128, 1)
    batch_size: int = bounded(32, 1)  # rows of the one decoder; sets are padded to whole batches
    engine: str = choice("static", ENGINES)
    compile: bool = True  # static engine on CUDA: the decode step becomes a CUDA graph


@dataclasses.dataclass
class RODiagnosticsConfig:
    # K=1 transfer on the first test set: -1 = the whole population, 0 = off, n = the top
    # max-K members (answered already for the ensembles) plus a seeded uniform sample of the rest.
    k1_seeds: int = bounded(-1, -1)
    merge_pairs: int = bounded(2, 0)  # pairs of top max-K members merged by average and by sum
    bpb_documents: int = bounded(8, 0)  # built-in validation documents for held-out bpb; 0 = off
    bpb_max_tokens: int = bounded(1024, 2)  # each document is cut to this many tokens


@dataclasses.dataclass
class RandOptConfig:
    """Defaults are a small search that finishes on a CPU in minutes; the `randopt-smollm2`
    preset is the GPU-sized one (population 128, 64 train / 200 test problems, 256 tokens)."""

    name: str = "randopt"
    model: str = "smollm2-135m"  # smollm2-135m, a local save_pretrained folder, or a hub id
    dtype: str = choice("auto", ("auto", "bfloat16", "float32"))  # auto: bf16 on CUDA, fp32 on CPU
    device: str = choice("auto", ("auto", "cpu", "cuda"))
    task: str = "gsm_symbolic"  # train task: its "train" split, the first train_examples
    train_examples: int = bounded(16, 1)
    test_tasks: list[str] = items(["gsm_symbolic", "asdiv"])  # "test" splits, first test_examples
    test_examples: int = bounded(32, 1)
    task_paths: list[str] = items([])  # "task=path" local files (gsm8k, math500); else hub/generated
    data_seed: int = 0  # generated tasks: which problems (fixed across global seeds)
    population: int = bounded(8, 1, 2**31)
    sigmas: list[float] = items([5e-4, 1e-3, 2e-3])
    seed: int = bounded(0, 0)  # the global seed: draws the population
    top_ratios: list[float] = items([0.02, 0.05])  # K = max(1, int(ratio * population))
    include: list[str] = items(["*"])  # parameter-name globs to perturb
    exclude: list[str] = items([])
    backend: str = choice("auto", BACKENDS)  # perturbation kernel: auto = Triton on CUDA
    decode: RODecodeConfig = nested(RODecodeConfig)
    diagnostics: RODiagnosticsConfig = nested(RODiagnosticsConfig)
    runs_root: str = "runs"

    def check(self) -> None:
        if not self.sigmas or not all(math.isfinite(s) and s > 0 for s in self.sigmas):
            raise ConfigError(f"sigmas = {self.sigmas} must be a non-empty list of positive numbers")
        if not self.top_ratios or not all(0 < r <= 1 for r in self.top_ratios):
            raise ConfigError(f"top_ratios = {self.top_ratios} must be a non-empty list of numbers in (0, 1]")
        if not self.test_tasks or len(set(self.test_tasks)) != len(self.test_tasks):
            raise ConfigError(f"test_tasks = {self.test_tasks} must name at least one task, each once")
        for name, split in [(self.task, "train"), *((t, "test") for t in self.test_tasks)]:
            task = get_task(name)
            if task.answer_kind is None:
                scored = ", ".join(n for n, t in TASKS.items() if t.answer_kind is not None)
                raise ConfigError(f"task {name!r} has no gold answers; randopt needs an answer-scored task ({scored})")
            if split not in task.splits:
                raise ConfigError(f"task {name!r} has no {split!r} split (it has {list(task.splits)}); "
                                  f"choose another {'task' if split == 'train' else 'test task'}")
        self.task_path(self.task)  # validates the task_paths entries

    def task_path(self, name: str) -> str | None:
        paths = {}
        for entry in self.task_paths:
            task, sep, path = entry.partition("=")
            if not sep or not task.strip() or not path.strip():
                raise ConfigError(f"task_paths entry {entry!r} must look like task=path/to/file.jsonl")
            paths[task.strip()] = path.strip()
        return paths.get(name)


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


# ---------------------------------------------------------------- prompts, answers, scores

@dataclasses.dataclass
class PromptSet:
    """One task's examples and their chat-templated prompt token ids (tokenized once)."""

    name: str
    task: Task
    examples: list[Example]
    ids: list[list[int]]


def load_prompts(tokenizer, cfg: RandOptConfig, name: str, split: str, limit: int) -> PromptSet:
    task = get_task(name)
    examples = task.load(split, limit=limit, seed=cfg.data_seed, path=cfg.task_path(name))
    if not examples:
        raise DataError(f"task {name!r} gave no {split} examples; check task_paths or the data")
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
    rewards = [prompts.task.reward(text, e) for text, e in zip(texts, prompts.examples)]
    digest = hashlib.sha1("\x00".join(texts).encode("utf-8")).hexdigest()[:16]
    return {"reward": mean(rewards), "tokens": stats.generated_tokens, "seconds": round(stats.seconds, 4),
            "digest": digest}


def sharded(env: dist.Env, items: Sequence[Any], fn: Callable[[Any], Any],
            on_round: Callable[[list[tuple[int, Any]]], None] | None = None) -> list[Any]:
    """[fn(x) for x in items], item i computed on rank i % world_size. After each round of
    world_size items the results are gathered on every rank (all_gather_object) and handed to
    `on_round` as (item position, result) pairs: rank 0 records them as they arrive."""
    results: list[Any] = [None] * len(items)
    for start in range(0, len(items), env.world_size):
        i = start + env.rank
        mine = (i, fn(items[i])) if i < len(items) else None
        gathered = [mine]
        if env.distributed:
            gathered = [None] * env.world_size
            torch_dist.all_gather_object(gathered, mine)
        done = [pair for pair in gathered if pair is not None]
        for i, result in done:
            results[i] = result
        if on_round is not None:
            on_round(done)
    return results


# ---------------------------------------------------------------- the run

def run(cfg: RandOptConfig | None = None, model=None, tokenizer=None,
        resume: str | Path | None = None) -> dict[str, Any]:
    """RandOpt per `cfg`. A caller may pass a loaded (model, tokenizer), e.g. one model for
    several global seeds: the weights are the base again when this returns. `resume` = a run
    directory: its config.json (unless `cfg` is given; it must define the same search) and
    population.jsonl are reloaded and only the missing candidates are scored."""
    if resume is not None:
        saved = cfglib.load_json(Path(resume) / "config.json")
        cfg = saved if cfg is None else cfg
        changed = [f for f in SEARCH_FIELDS if getattr(saved, f) != getattr(cfg, f)]
        if changed:
            raise ConfigError(f"resuming {resume} with different {', '.join(changed)}; these define the "
                              "population and its scores, so start a new run to change them")
    if cfg is None:
        raise ConfigError("randopt needs a config, or a run directory to resume")
    cfglib.validate(cfg)
    env = dist.setup(cfg.device)
    try:
        return _run(cfg, env, model, tokenizer, resume)
    finally:
        dist.teardown()


def _run(cfg: RandOptConfig, env: dist.Env, model, tokenizer, resume) -> dict[str, Any]:
    timing: dict[str, float] = {}
    clock = time.perf_counter()

    def lap(name: str) -> None:
        nonlocal clock
        timing[name] = round(time.perf_counter() - clock, 3)
        clock = time.perf_counter()

    # ---- 1. model, perturbation space, run directory, prompt sets --------------------------
    if model is not None and tokenizer is None:
        raise ConfigError("run(cfg, model, tokenizer): pass the model's tokenizer too")
    # Under torchrun rank 0 loads first and fills the caches (converted model, generated task
    # data) that the other ranks then only read: each rank passes one barrier, before or after.
    if env.distributed and not env.is_main:
        torch_dist.barrier()
    if model is None:
        model, tokenizer = hf.load_model(cfg.model, device=env.device, dtype=None if cfg.dtype == "auto" else cfg.dtype)
    train = load_prompts(tokenizer, cfg, cfg.task, "train", cfg.train_examples)
    tests = [load_prompts(tokenizer, cfg, name, "test", cfg.test_examples) for name in cfg.test_tasks]
    if env.distributed and env.is_main:
        torch_dist.barrier()
    space = PerturbSpace(model, cfg.include, cfg.exclude)
    run_dir = _run_dir(cfg, env, resume)
    run_dir.save_config(cfg)
    decode = DecodeConfig(**dataclasses.asdict(cfg.decode))
    rows_per_batch = min(cfg.decode.batch_size, max(len(s.ids) for s in [train, *tests]))
    answerer = Answerer(model, tokenizer, decode, rows_per_batch)
    N = cfg.population
    test_sizes = ", ".join(f"{s.name} x{len(s.examples)}" for s in tests)
    run_dir.log(f"randopt {cfg.model}: {space.numel:,} parameters in {len(space.names)} tensors perturbed | "
                f"train {train.name} x{len(train.examples)} | test {test_sizes} | population {N}, sigmas "
                f"{cfg.sigmas} | {env.world_size} process(es) on {env.device}, {rows_per_batch} rows per batch")
    lap("load")
    try:
        # ---- 2. warm-up (builds the one decoder), base accuracy ----------------------------
        answerer.warm_up([train, *tests])
        lap("warmup")
        base_answers = sharded(env, [train, *tests], answerer.answers)
        base = {"train": accuracy_ci(correct(train, base_answers[0])),
                "test": {s.name: accuracy_ci(correct(s, a)) for s, a in zip(tests, base_answers[1:])}}
        run_dir.log(f"base: train {base['train']['mean']:.3f} | "
                    + " | ".join(f"{n} {a['mean']:.3f}" for n, a in base["test"].items()))
        lap("base")

        # ---- 3. population search: one JSON line per candidate as it arrives -----------------
        population = draw_population(N, cfg.sigmas, cfg.seed)
        pop_file = run_dir.file(POPULATION_FILE)
        rows = read_population(pop_file, population, env.is_main) if resume is not None else {}
        missing = [i for i in range(N) if i not in rows]
        if rows:
            run_dir.log(f"resume: {len(rows)} candidates scored already, {len(missing)} to go")

        def score(i: int) -> dict[str, Any]:
            seed, sigma = population[i]
            return {"index": i, "seed": seed, "sigma": sigma,
                    **score_candidate(answerer, space, train, seed, sigma, cfg.backend)}

        search_start = time.perf_counter()
        with progress() as bar:
            bar_id = bar.add_task("population", total=N, completed=len(rows), info="")

            def arrived(pairs: list[tuple[int, dict]]) -> None:
                for _, row in pairs:
                    rows[row["index"]] = row
                if run_dir.writer:
                    with open(pop_file, "a") as f:
                        f.write("".join(json.dumps(row) + "\n" for _, row in pairs))
                rate = (len(rows) - (N - len(missing))) / (time.perf_counter() - search_start)
                best = max(r["reward"] for r in rows.values())
                bar.update(bar_id, advance=len(pairs), info=f"{rate:.2f} seeds/s, best {best:.3f}")

            sharded(env, missing, score, on_round=arrived)
        search_seconds = time.perf_counter() - search_start
        rows = [rows[i] for i in range(N)]
        lap("search")

        # ---- 4. selection ----------------------------------------------------------------------
        ranked = rank(rows)
        ks = {ratio: top_k(ratio, N) for ratio in cfg.top_ratios}
        members = ranked[:max(ks.values())]
        rewards = ", ".join(f"{rows[i]['reward']:.3f}" for i in members)
        run_dir.log(f"top {len(members)} by train reward: {rewards}")

        def answers_of(i: int, sets: Sequence[PromptSet]) -> list[list[str | None]]:
            space.apply(*population[i], cfg.backend)
            return [answerer.answers(s) for s in sets]

        # ---- 5. ensembles: each member answers each test set once; majority vote per K -------
        member_answers = dict(zip(members, sharded(env, members, lambda i: answers_of(i, tests))))
        ensembles = []
        for t, s in enumerate(tests):
            keys = {m: [vote_key(a, s.task.answer_kind) for a in member_answers[m][t]] for m in members}
            for ratio, k in ks.items():
                voters = members[:k]
                voted = ensemble.vote_all([member_answers[m][t] for m in voters], s.task.answer_kind, [keys[m] for m in voters])
                acc = accuracy_ci(correct(s, voted))
                singles = [mean(correct(s, member_answers[m][t])) for m in voters]
                ensembles.append({"task": s.name, "ratio": ratio, "k": k, "accuracy": acc, "base": base["test"][s.name],
                                  "delta": acc["mean"] - base["test"][s.name]["mean"],
                                  "members_mean_accuracy": mean(singles), "best_member_accuracy": max(singles)})
                run_dir.log(f"{s.name} K={k}: ensemble {acc['mean']:.3f} [{acc['lo']:.3f}, {acc['hi']:.3f}] "
                            f"vs base {base['test'][s.name]['mean']:.3f}")
        lap("ensembles")

        # ---- 6a. K=1 diagnostic: single seeds' train reward vs accuracy on the first test set --
        first, first_base = tests[0], base["test"][tests[0].name]["mean"]
        singles_k1 = k1_indices(cfg.diagnostics.k1_seeds, ranked, len(members), cfg.seed)
        extra = [i for i in singles_k1 if i not in member_answers]
        first_answers = {m: member_answers[m][0] for m in members}
        first_answers.update(zip(extra, sharded(env, extra, lambda i: answers_of(i, [first])[0])))
        single = {i: mean(correct(first, a)) for i, a in first_answers.items()}  # accuracy of each seed alone
        k1 = ensemble.transfer_stats(rows, singles_k1, single, first_base, first.name) if singles_k1 else None
        lap("k1")

        # ---- 6b. merges of two members: average and sum of their perturbations ---------------
        pairs = merge_pairs(members, cfg.diagnostics.merge_pairs, cfg.seed)
        jobs = [(a, b, op) for a, b in pairs for op in ensemble.MERGE_OPS]

        def merged_accuracy(job: tuple[int, int, str]) -> float:
            a, b, op = job
            (seed_a, sigma_a), (seed_b, sigma_b) = population[a], population[b]
            h = ensemble.MERGE_OPS[op]
            space.apply_combination([(seed_a, h * sigma_a), (seed_b, h * sigma_b)], cfg.backend)
            return mean(correct(first, answerer.answers(first)))

        merged = dict(zip(jobs, sharded(env, jobs, merged_accuracy)))
        merges = ensemble.merge_stats(pairs, merged, rows, single, first_base, first.name) if pairs else None
        lap("merges")

        # ---- 6c. held-out bits per byte: base vs the probability-averaged top-K ensemble -----
        bpb = None
        if cfg.diagnostics.bpb_documents:
            val_documents = corpora.split_documents(corpora.load_documents("builtin"))[1]
            context = getattr(model.config, "max_position_embeddings", None) or cfg.diagnostics.bpb_max_tokens
            max_tokens = min(cfg.diagnostics.bpb_max_tokens, context)
            doc_ids, n_bytes = ensemble.encode_documents(
                tokenizer, val_documents[:cfg.diagnostics.bpb_documents], max_tokens)

            def logprobs(i: int | None):
                if i is None:
                    space.restore()
                else:
                    space.apply(*population[i], cfg.backend)
                return ensemble.token_logprobs(model, doc_ids)

            base_lp, *member_lp = sharded(env, [None, *members], logprobs)
            bpb = {"documents": len(doc_ids), "tokens": sum(len(d) - 1 for d in doc_ids), "bytes": n_bytes,
                   "max_tokens": max_tokens, "base": ensemble.bits_per_byte(base_lp, n_bytes),
                   "members_mean": mean([ensemble.bits_per_byte(lp, n_bytes) for lp in member_lp]),
                   "ensembles": [{"ratio": r, "k": k,
                                  "bpb": ensemble.bits_per_byte(ensemble.ensemble_logprobs(member_lp[:k]), n_bytes)}
                                 for r, k in ks.items()]}
            run_dir.log(f"held-out bpb: base {bpb['base']:.5f} | "
                        + " | ".join(f"K={e['k']} {e['bpb']:.5f}" for e in bpb["ensembles"]))
        lap("bpb")
    finally:
        space.restore()

    # ---- 7. summary and plot ---------------------------------------------------------------
    import transformers

    scored_tokens = sum(rows[i]["tokens"] for i in missing)
    summary = {
        "name": cfg.name, "run_dir": str(run_dir.path), "model": cfg.model, "task": cfg.task,
        "world_size": env.world_size, "train_examples": len(train.examples),
        "test_examples": {s.name: len(s.examples) for s in tests},
        "perturbed_parameters": space.numel, "perturbed_tensors": len(space.names), "decoder_rows": answerer.rows,
        "base": base,
        "population": ensemble.population_stats(rows, ranked, base["train"]["mean"]),
        "search": {"scored": len(missing), "resumed": N - len(missing), "seconds": round(search_seconds, 3),
                   "seeds_per_second": len(missing) / search_seconds if missing else None,
                   "decoded_tokens_per_second": scored_tokens / search_seconds if missing else None},
        "ensembles": ensembles,
        "diagnostics": {"k1": k1, "merges": merges, "bpb": bpb},
        "timing": timing,
        "transformers": transformers.__version__,
        **environment(),
    }
    run_dir.save_summary(summary)
    if run_dir.writer and k1 is not None:
        ensemble.plot_transfer(k1, base["train"]["mean"], run_dir.file("k1_transfer.png"))
    run_dir.log(report(summary))
    return summary


def _run_dir(cfg: RandOptConfig, env: dist.Env, resume) -> RunDir:
    """The resumed directory, or a new one named by rank 0 (never an existing one: a fresh
    search must not append to an older population.jsonl) and broadcast to the other ranks."""
    if resume is not None:
        return RunDir(resume, writer=env.is_main)
    path = None
    if env.is_main:
        path = base = RunDir.create(cfg.runs_root, cfg.name, writer=False).path
        for n in itertools.count(2):
            if not path.exists():
                break
            path = base.with_name(f"{base.name}-{n}")
    if env.distributed:
        box = [str(path) if path else None]
        torch_dist.broadcast_object_list(box, src=0)
        path = Path(box[0])
    return RunDir(path, writer=env.is_main)


# ---------------------------------------------------------------- report

def report(summary: dict[str, Any]) -> str:
    """A short text report: base vs ensemble per test set and K, search speed, diagnostics."""
    lines = ["| test set | K | base | ensemble [95% CI] | delta (pp) | members mean |", "|---|---|---|---|---|---|"]
    for e in summary["ensembles"]:
        acc = e["accuracy"]
        lines.append(f"| {e['task']} | {e['k']} | {e['base']['mean']:.3f} | {acc['mean']:.3f} [{acc['lo']:.3f}, "
                     f"{acc['hi']:.3f}] | {100 * e['delta']:+.1f} | {e['members_mean_accuracy']:.3f} |")
    search = summary["search"]
    if search["seeds_per_second"] is not None:
        lines.append(f"search: {search['scored']} candidates in {search['seconds']:.1f} s = "
                     f"{search['seeds_per_second']:.3f} seeds/s")
    k1 = summary["diagnostics"]["k1"]
    if k1 is not None:
        rho = "n/a" if k1["spearman"] is None else f"{k1['spearman']:.3f}"
        lines.append(f"K=1 on {k1['task']} ({k1['seeds']} seeds): Spearman {rho}, oracle best {k1['oracle_best']:.3f}, "
                     f"train-selected {k1['train_selected']:.3f}, mean {k1['mean']:.3f}, base {k1['base']:.3f}")
    merges = summary["diagnostics"]["merges"]
    if merges is not None:
        lines.append(f"merges on {merges['task']} ({len(merges['pairs'])} pairs, parents mean {merges['parents_mean']:.3f}): "
                     + ", ".join(f"{op} {v['mean']:.3f} (beats both parents {v['beats_both_parents']:.0%})"
                                 for op, v in merges["operators"].items()))
    bpb = summary["diagnostics"]["bpb"]
    if bpb is not None:
        lines.append(f"held-out bpb ({bpb['documents']} documents): base {bpb['base']:.5f}, "
                     + ", ".join(f"K={e['k']} {e['bpb']:.5f}" for e in bpb["ensembles"]))
    lines.append(f"run directory {summary['run_dir']}")
    return "\n".join(lines)
